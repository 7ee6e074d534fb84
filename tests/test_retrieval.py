"""Retriever: every query form → one embedding, search semantics, errors, model/index mismatch, thread safety."""

from __future__ import annotations

import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from cdretrieval.config import RunConfig
from cdretrieval.data.demo import DEMO_SIZE, _stroke_mask, render_ink, render_outline, render_photo
from cdretrieval.errors import IndexFileError, IndexMismatchError, QueryError
from cdretrieval.index import IndexSet
from cdretrieval.models.runtime import RUNTIME_ENV
from cdretrieval.retrieval import Retriever, SearchResult, calibrate_scores, merge_calibrated
from cdretrieval.run import INDEX_DIR, load_checkpoint, save_checkpoint

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
    detection = info["domain_detection"]
    assert detection["domains"] == ["ink", "outline", "photo"] and detection["feature"] == "backbone"
    assert detection["holdout_accuracy"] >= 0.95


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
    """Ranks 1..k, ranked by calibrated score, cosines in [-1, 1] and in order within each domain."""
    assert [r.rank for r in results] == list(range(1, k + 1))
    calibrated = [r.calibrated_score for r in results]
    assert all(c is not None for c in calibrated) and calibrated == sorted(calibrated, reverse=True)  # type: ignore
    for d in {r.domain for r in results}:
        scores = [r.score for r in results if r.domain == d]
        assert scores == sorted(scores, reverse=True)
    assert {r.domain for r in results} <= domains
    assert all(-1.0001 <= r.score <= 1.0001 for r in results)


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
    # The merge is the best 10 of the union of the per-domain top 10s, by calibrated score.
    union = retriever.search(q, "outline", k=10) + retriever.search(q, "photo", k=10)
    expected = sorted(union, key=lambda r: -(r.calibrated_score or 0.0))[:10]
    assert [(r.domain, r.item_id) for r in both] == [(r.domain, r.item_id) for r in expected]

    everything = retriever.search(q, ["ink", "outline", "photo"], k=5)  # its own domain too, when asked for
    _check_results(everything, 5, {"ink", "outline", "photo"})
    others = retriever.search(q, k=30, source_domain="ink")
    _check_results(others, 30, {"outline", "photo"})
    assert {r.domain for r in others} == {"outline", "photo"}


def _fresh_demo_images(per_domain: int = 20) -> dict[str, list[Image.Image]]:
    """Demo-style images of digits the 120-per-domain test data does not hold (held out from the index)."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits().images[-3 * per_domain:]  # the last digits: beyond the test data's capped thirds
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(7)
    out: dict[str, list[Image.Image]] = {"ink": [], "outline": [], "photo": []}
    for i, d8 in enumerate(digits):
        mask = _stroke_mask(d8, rng, DEMO_SIZE)  # rendered as the demo data is (the model resizes)
        domain = list(out)[i % 3]
        img = render_ink(mask) if domain == "ink" else (
            render_outline(mask, rng) if domain == "outline" else render_photo(mask, photos, rng))
        out[domain].append(img)
    return out


def test_detect_domain_on_demo_images(retriever: Retriever) -> None:
    fresh = _fresh_demo_images()
    for domain, images in fresh.items():
        found = retriever.detect_domain_batch(images)
        # ≥ 95 % per domain: a demo photo whose patch is pale and flat can pass for ink (measured 60/60 here)
        right = sum(f.domain == domain for f in found)
        assert right >= 0.95 * len(images), (domain, [f.domain for f in found])
        for f in found:
            assert f.confidence == max(f.probabilities.values())
            assert f.domain != domain or f.confidence > 0.5
    indexed = [retriever.indexes[d].items[i].path for d in retriever.domains for i in (1, 50)]
    assert [d.domain for d in retriever.detect_domain_batch(indexed)] == ["ink"] * 2 + ["outline"] * 2 + ["photo"] * 2
    domain, confidence, probabilities = retriever.detect_domain(indexed[0])  # a named tuple
    assert confidence == max(probabilities.values())
    assert domain == "ink" and set(probabilities) == {"ink", "outline", "photo"}


def test_auto_search_excludes_the_detected_domain(retriever: Retriever) -> None:
    photo = _fresh_demo_images()["photo"][0]
    response = retriever.retrieve(photo, k=12)  # source_domain="auto" by default
    assert response.source == "detected" and response.source_domain == "photo"
    assert response.detection is not None and response.detection.domain == "photo"
    assert response.target_domains == ["ink", "outline"]
    _check_results(response.results, 12, {"ink", "outline"})
    assert retriever.search(photo, k=12, source_domain=None) == response.results  # None means auto too
    as_dict = response.to_dict()
    assert as_dict["detected"]["domain"] == "photo" and as_dict["source"] == "detected"
    given = retriever.retrieve(photo, k=5, source_domain="ink")  # a given domain is not second-guessed
    assert given.source == "given" and given.detection is None and given.target_domains == ["outline", "photo"]
    explicit = retriever.retrieve(photo, "photo", k=3)  # explicit targets are searched; detection is reported
    assert explicit.target_domains == ["photo"] and explicit.source_domain == "photo"
    batch = retriever.retrieve_batch([photo, _fresh_demo_images()["ink"][0]], k=4)
    assert [r.source_domain for r in batch] == ["photo", "ink"]
    assert [r.target_domains for r in batch] == [["ink", "outline"], ["outline", "photo"]]


def test_index_without_detector_searches_every_domain(indexed_run: Path, tmp_path: Path) -> None:
    iset = IndexSet.load(indexed_run / INDEX_DIR)
    iset.set_detector(None)
    plain = iset.save(tmp_path / "index")
    retriever = Retriever.from_run(indexed_run, device="cpu", index_dir=plain)
    assert retriever.detector is None and retriever.info()["domain_detection"] is None
    with pytest.raises(QueryError, match="domain detection is unavailable.*cdretrieval index"):
        retriever.detect_domain(_ink_path(retriever))
    response = retriever.retrieve(_ink_path(retriever), k=5)
    assert response.source == "unknown" and response.source_domain is None and response.detection is None
    assert response.target_domains == ["ink", "outline", "photo"]
    _check_results(response.results, 5, {"ink", "outline", "photo"})


def test_calibrated_merge_ignores_a_domain_offset() -> None:
    """Adding a constant to one domain's cosines (hits and background alike) leaves the merged order as it is."""
    rng = np.random.default_rng(0)
    q, k = 20, 10
    backgrounds = [rng.normal(m, s, size=(q, 300)) for m, s in ((0.2, 0.1), (0.5, 0.05), (0.0, 0.2))]
    scores = [-np.sort(-rng.normal(m + 2.5 * s, s, size=(q, k)), axis=1)
              for m, s in ((0.2, 0.1), (0.5, 0.05), (0.0, 0.2))]
    base = merge_calibrated(scores, backgrounds, k)
    for t in range(3):
        for offset in (0.3, -0.4):
            shifted_s = [s + offset if i == t else s for i, s in enumerate(scores)]
            shifted_b = [b + offset if i == t else b for i, b in enumerate(backgrounds)]
            got = merge_calibrated(shifted_s, shifted_b, k)
            np.testing.assert_array_equal(got[0], base[0])
            np.testing.assert_array_equal(got[1], base[1])
    # Two domains alike but one offset by +0.2: raw cosine hands it the whole list, calibration shares it.
    alike = [rng.normal(0.3, 0.1, size=(q, 300)) for _ in range(2)]
    hits = [-np.sort(-a, axis=1)[:, :k] for a in alike]  # each domain's best k
    hits[1] = hits[1] + 0.2
    alike[1] = alike[1] + 0.2
    raw = np.argsort(-np.concatenate(hits, axis=1), axis=1, kind="stable")[:, :k] >= k
    assert raw.mean() > 0.9  # by raw score the offset domain crowds the other out
    dom, _, z = merge_calibrated(hits, alike, k)
    assert 0.3 < (dom == 1).mean() < 0.7
    assert np.all(np.diff(z, axis=1) <= 0)
    assert calibrate_scores(np.array([[-np.inf, 0.5]]), np.array([[0.5, 0.5]]))[0, 0] == -np.inf


def test_retriever_merge_ignores_a_domain_offset(retriever: Retriever, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the Retriever: one target's cosines (hits and distribution) shifted by +0.5 change nothing."""
    queries = [_ink_path(retriever, i) for i in (0, 7, 21)]
    before = [[(r.domain, r.item_id) for r in hits] for hits in retriever.search_batch(queries, k=10)]
    original = Retriever._scored

    def shifted(self: Retriever, domain: str, unit: np.ndarray, k: int, rerank: bool | None) -> tuple:
        scores, ids, background = original(self, domain, unit, k, rerank)
        return (scores + 0.5, ids, background + 0.5) if domain == "photo" else (scores, ids, background)

    monkeypatch.setattr(Retriever, "_scored", shifted)
    after = [[(r.domain, r.item_id) for r in hits] for hits in retriever.search_batch(queries, k=10)]
    assert after == before
    assert all({d for d, _ in hits} == {"outline", "photo"} for hits in after)  # both domains get a share


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


def test_queries_run_on_onnxruntime_and_match_pytorch(retriever: Retriever, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default (``auto``) on the CPU a query's backbone runs under ONNX Runtime, "auto" queries (index and
    detector features from one pass) included; its embeddings are PyTorch's to 1e-4, and so are the answers."""
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    fast = Retriever(dataclasses.replace(retriever.model, runtime=None), retriever.indexes)
    eager = Retriever(dataclasses.replace(retriever.model, runtime="torch"), retriever.indexes)
    queries = [_ink_path(retriever, i) for i in (0, 3)] + [retriever.indexes["photo"].items[5].path]
    got = fast.encode_batch(queries)
    assert fast.model.backbone_forward().runtime == "onnxruntime"
    assert eager.model.backbone_forward().runtime == "torch"
    np.testing.assert_allclose(got, eager.encode_batch(queries), atol=1e-4)
    both, detector_vectors = fast._forward(queries, "backbone")  # what retrieve() computes for "auto"
    np.testing.assert_array_equal(both, got)
    _, eager_vectors = eager._forward(queries, "backbone")
    np.testing.assert_allclose(detector_vectors, eager_vectors, atol=1e-4)
    for q in queries:
        a, b = fast.retrieve(q, k=5), eager.retrieve(q, k=5)
        assert a.source_domain == b.source_domain and a.source == "detected"
        assert [(r.domain, r.item_id) for r in a.results] == [(r.domain, r.item_id) for r in b.results]
        np.testing.assert_allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-4)


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
