"""Retriever: every query form → one embedding, search semantics, errors, model/index mismatch, thread safety."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from cdretrieval.config import RunConfig
from cdretrieval.errors import IndexFileError, IndexMismatchError, QueryError
from cdretrieval.retrieval import Retriever, SearchResult
from cdretrieval.run import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def retriever(indexed_run: Path) -> Retriever:
    return Retriever.from_run(indexed_run, device="cpu")


def _ink_path(r: Retriever, i: int = 3) -> str:
    return r.indexes["ink"].items[i].path


def test_info_and_domains(retriever: Retriever, indexed_run: Path, demo_root: Path) -> None:
    info = retriever.info()
    assert retriever.domains == ["ink", "outline", "photo"]
    assert info["counts"] == {"ink": 120, "outline": 120, "photo": 120}
    assert info["dim"] == 32 and info["feature"] == "head" and info["image_size"] == 64
    assert info["backbone"] == "efficientnet_lite0" and info["index_type"] == "flat"
    assert info["data_root"] == str(demo_root.resolve()) and info["run_dir"] == str(indexed_run.resolve())


def test_every_query_form_gives_the_same_embedding(retriever: Retriever) -> None:
    path = _ink_path(retriever)
    img = Image.open(path).convert("RGB")
    rgb = np.asarray(img)  # (H, W, 3) uint8
    tensor = TF.to_tensor(img)  # (3, H, W) float in [0, 1]
    forms = {
        "str": path,
        "Path": Path(path),
        "bytes": Path(path).read_bytes(),
        "PIL": img,
        "PIL grey": img.convert("L"),  # ink images are grey: same pixels
        "uint8 HxWx3": rgb,
        "float HxWx3": rgb.astype(np.float32) / 255.0,
        "uint8 HxW": rgb[:, :, 0].copy(),
        "tensor float": tensor,
        "tensor uint8": torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(),
    }
    ref = retriever.encode(path)
    assert ref.shape == (32,) and ref.dtype == np.float32
    assert np.linalg.norm(ref) == pytest.approx(1.0, abs=1e-5)
    for name, q in forms.items():
        np.testing.assert_allclose(retriever.encode(q), ref, atol=1e-5, err_msg=name)
    batch = retriever.encode_batch(list(forms.values()))
    np.testing.assert_allclose(batch, np.tile(ref, (len(forms), 1)), atol=1e-5)


def _check_results(results: list[SearchResult], k: int, domains: set[str]) -> None:
    assert [r.rank for r in results] == list(range(1, k + 1))
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert {r.domain for r in results} <= domains
    assert all(-1.0001 <= s <= 1.0001 for s in scores)


def test_search_one_target(retriever: Retriever) -> None:
    results = retriever.search(_ink_path(retriever), "photo", k=7)
    _check_results(results, 7, {"photo"})
    for r in results:
        item = retriever.item("photo", r.item_id)
        assert (item.path, item.label) == (r.path, r.label) and r.label is not None
    assert results[0].to_dict()["rank"] == 1


def test_indexed_image_finds_itself_first(retriever: Retriever) -> None:
    for domain in retriever.domains:
        item = retriever.indexes[domain].items[11]
        top = retriever.search(item.path, domain, k=3)[0]
        assert (top.path, top.item_id, top.domain) == (item.path, 11, domain)
        assert top.score == pytest.approx(1.0, abs=1e-4)


def test_several_and_all_targets(retriever: Retriever) -> None:
    q = _ink_path(retriever)
    both = retriever.search(q, ["outline", "photo"], k=10)
    _check_results(both, 10, {"outline", "photo"})
    # The merge is the best 10 of the union of the per-domain top 10s.
    union = retriever.search(q, "outline", k=10) + retriever.search(q, "photo", k=10)
    expected = sorted((r.score for r in union), reverse=True)[:10]
    np.testing.assert_allclose([r.score for r in both], expected, rtol=1e-6)

    everything = retriever.search(q, None, k=5)
    _check_results(everything, 5, {"ink", "outline", "photo"})
    assert everything[0].domain == "ink" and everything[0].score == pytest.approx(1.0, abs=1e-4)  # itself
    others = retriever.search(q, k=30, source_domain="ink")
    _check_results(others, 30, {"outline", "photo"})
    assert {r.domain for r in others} == {"outline", "photo"}


def test_k_larger_than_gallery_returns_all(retriever: Retriever) -> None:
    results = retriever.search(_ink_path(retriever), "photo", k=1000)
    _check_results(results, 120, {"photo"})
    assert len({r.item_id for r in results}) == 120


def test_search_batch_matches_single_searches(retriever: Retriever) -> None:
    paths = [_ink_path(retriever, i) for i in (0, 5, 9)]
    batch = retriever.search_batch(paths, "photo", k=4)
    assert len(batch) == 3
    for path, got in zip(paths, batch, strict=True):
        single = retriever.search(path, "photo", k=4)
        assert [r.item_id for r in got] == [r.item_id for r in single]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in single], atol=1e-5)
    assert retriever.search_batch([], "photo") == []


def test_concurrent_searches_agree(retriever: Retriever) -> None:
    paths = [_ink_path(retriever, i) for i in range(6)]
    expected = [[r.item_id for r in retriever.search(p, "outline", k=5)] for p in paths]
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda p: [r.item_id for r in retriever.search(p, "outline", k=5)], paths))
    assert got == expected


def test_query_errors(retriever: Retriever, tmp_path: Path) -> None:
    q = _ink_path(retriever)
    with pytest.raises(QueryError, match=r"unknown target domain 'sketch'.*\['ink', 'outline', 'photo'\]"):
        retriever.search(q, "sketch")
    with pytest.raises(QueryError, match="unknown source domain"):
        retriever.search(q, source_domain="sketch")
    with pytest.raises(QueryError, match="unknown target domain"):
        retriever.search(q, ["photo", "nope"])
    for k in (0, -3, True, 2.5):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            retriever.search(q, "photo", k=k)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match=r"\(4, 64, 64\)"):
        retriever.encode(torch.rand(4, 64, 64))
    with pytest.raises(QueryError, match=r"\(1, 3, 64, 64\)"):
        retriever.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(QueryError, match=r"\(64, 64, 5\)"):
        retriever.encode(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(QueryError, match="dtype int16"):
        retriever.encode(np.zeros((64, 64), np.int16))
    with pytest.raises(QueryError, match=r"expected \[0, 1\]"):
        retriever.encode(np.full((64, 64, 3), 200.0, np.float32))
    with pytest.raises(QueryError, match="corrupt|not a readable image"):
        retriever.encode(b"\x89PNG\r\n\x1a\n corrupt")
    with pytest.raises(QueryError, match="no such file"):
        retriever.encode(tmp_path / "missing.png")
    with pytest.raises(QueryError, match="got int"):
        retriever.encode(42)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="list of queries"):
        retriever.search_batch(q, "photo")


def test_example_items_and_resolve_item_path(retriever: Retriever, tmp_path: Path) -> None:
    ex = retriever.example_items("photo", 5, seed=1)
    assert len(ex) == 5 and len({e.path for e in ex}) == 5 and all(e.domain == "photo" for e in ex)
    assert [e.path for e in retriever.example_items("photo", 5, seed=1)] == [e.path for e in ex]
    assert len(retriever.example_items("photo", 500)) == 120
    with pytest.raises(QueryError, match="unknown domain"):
        retriever.example_items("sketch", 3)

    path = ex[0].path
    assert retriever.resolve_item_path(path) == Path(path)
    parent = Path(path).parent
    assert retriever.resolve_item_path(f"{parent}/../{parent.name}/{Path(path).name}") == Path(path)
    outside = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(outside)
    assert retriever.resolve_item_path(outside) is None
    assert retriever.resolve_item_path("/etc/passwd") is None
    assert retriever.resolve_item_path(None) is None


def test_changed_model_is_refused(indexed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(indexed_run, run)
    ckpt = load_checkpoint(run)
    state = ckpt["model"]
    last_bias = sorted(k for k in state if k.startswith("head.") and k.endswith(".bias"))[-1]
    state[last_bias] = state[last_bias] + 0.5  # another model, same shapes
    save_checkpoint(run, {"model": state}, RunConfig.from_dict(ckpt["config"]))
    with pytest.raises(IndexMismatchError, match=rf"cdretrieval index --run {run}"):
        Retriever.from_run(run, device="cpu")


def test_run_without_index(tiny_run: Path) -> None:
    with pytest.raises(IndexFileError, match="cdretrieval index --run"):
        Retriever.from_run(tiny_run, device="cpu")
