"""Re-ranking: DBA and αQE against loop references, neighbour graphs, indexes, Retriever, evaluate, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdretrieval import metrics
from cdretrieval.cli import main
from cdretrieval.errors import IndexFileError, QueryError
from cdretrieval.evaluation import evaluate
from cdretrieval.index import MANIFEST_FILE, DomainIndex, IndexSet, Item
from cdretrieval.indexing import build_indexes
from cdretrieval.rerank import (
    DEFAULT_RERANK,
    ArrayGallery,
    RerankParams,
    alpha_query_expansion,
    augment_new_items,
    database_side_augmentation,
    knn_graph,
    l2_normalize,
)
from cdretrieval.retrieval import Retriever
from cdretrieval.run import INDEX_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

FAST: dict[str, Any] = {"num_workers": 0, "progress": False, "device": "cpu"}
DIM = 32

# Four unit vectors in 2-D, cosines: a·b = 0.8, a·c = 0.6, a·d = 0, b·c = 0.96, b·d = 0.6, c·d = 0.8.
HAND = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], np.float32)


def clustered(n: int, seed: int, dim: int = DIM, n_centres: int = 30, spread: float = 0.35) -> np.ndarray:
    """[n, dim] L2-normalised points around shared random centres."""
    centres = np.random.default_rng(1234).standard_normal((n_centres, dim))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_centres, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_items(n: int, domain: str = "photo", start: int = 0) -> list[Item]:
    return [Item(f"{domain}/c{i % 7}/img{i}.png", domain, f"c{i % 7}") for i in range(start, start + n)]


# -- loop references: the papers' formulas, one vector at a time ---------------------------------------------


def dba_reference(x: np.ndarray, k: int, power: float) -> np.ndarray:
    x = x.astype(np.float64)
    out = np.empty_like(x)
    for i in range(len(x)):
        sims = x @ x[i]
        order = [i] + [j for j in np.argsort(-sims, kind="stable") if j != i]  # itself first
        v = np.zeros(x.shape[1])
        for j in order[: min(k, len(x))]:
            v += max(sims[j], 0.0) ** power * x[j]
        out[i] = v / np.linalg.norm(v)
    return out


def aqe_reference(q: np.ndarray, gallery: np.ndarray, k: int, alpha: float) -> np.ndarray:
    g = gallery.astype(np.float64)
    out = np.empty((len(q), g.shape[1]))
    for i, qi in enumerate(q.astype(np.float64)):
        qi = qi / np.linalg.norm(qi)
        sims = g @ qi
        v = qi.copy()
        for j in np.argsort(-sims, kind="stable")[: min(k, len(g))]:
            v += max(sims[j], 0.0) ** alpha * g[j]
        out[i] = v / np.linalg.norm(v)
    return out


# -- params ----------------------------------------------------------------------------------------------------


def test_params_defaults_validation_and_dict() -> None:
    p = RerankParams()
    assert (p.dba_k, p.dba_power, p.qe_k, p.qe_alpha) == (20, 3.0, 20, 3.0) and p == DEFAULT_RERANK
    assert p.to_dict() == {"dba_k": 20, "dba_power": 3.0, "qe_k": 20, "qe_alpha": 3.0}
    assert RerankParams.from_dict(p.to_dict()) == p
    assert RerankParams.from_dict({"qe_k": 0}) == RerankParams(qe_k=0) and not RerankParams(qe_k=0).uses_qe
    assert not RerankParams(dba_k=1).uses_dba and isinstance(RerankParams(dba_power=2).dba_power, float)
    json.dumps(p.to_dict())
    for bad, match in [({"dba_k": 0}, "dba_k.*0"), ({"qe_k": -1}, "qe_k.*-1"), ({"dba_k": True}, "dba_k.*True"),
                       ({"dba_k": 2.5}, "dba_k.*2.5"), ({"qe_alpha": -1.0}, "qe_alpha.*-1.0"),
                       ({"dba_power": float("nan")}, "dba_power.*nan"), ({"qe_alpha": "3"}, "qe_alpha.*'3'")]:
        with pytest.raises(ValueError, match=match):
            RerankParams(**bad)
    with pytest.raises(ValueError, match=r"unknown re-ranking params \['alpha'\]"):
        RerankParams.from_dict({"alpha": 3})


# -- DBA, αQE, graphs on hand-made and random data ------------------------------------------------------------


def test_dba_matches_hand_values_and_loop_reference() -> None:
    out = database_side_augmentation(HAND, RerankParams(dba_k=2, dba_power=3))
    # a's neighbours: itself (weight 1) and b (0.8³ = 0.512): (1 + 0.4096, 0.3072), normalised.
    v = np.array([1.4096, 0.3072])
    np.testing.assert_allclose(out[0], v / np.linalg.norm(v), atol=1e-6)
    # b's neighbours: itself and c (0.96³).
    w = HAND[1] + 0.96**3 * HAND[2]
    np.testing.assert_allclose(out[1], w / np.linalg.norm(w), atol=1e-6)
    for k, power in [(1, 3.0), (2, 3.0), (3, 1.0), (4, 3.0), (10, 0.0)]:
        got = database_side_augmentation(HAND, RerankParams(dba_k=k, dba_power=power))
        assert got.dtype == np.float32 and got.shape == HAND.shape
        np.testing.assert_allclose(got, dba_reference(HAND, k, power), atol=1e-6, err_msg=f"k={k} p={power}")
    x = clustered(300, seed=2)
    np.testing.assert_allclose(database_side_augmentation(x, RerankParams(dba_k=7, dba_power=3)),
                               dba_reference(x, 7, 3.0), atol=1e-5)


def test_alpha_qe_matches_hand_values_and_loop_reference() -> None:
    q = np.array([[0.96, 0.28]], np.float32)  # sims with a, b, c, d: 0.96, 0.936, 0.8, 0.28 (no ties)
    got = alpha_query_expansion(q * 5.0, HAND, RerankParams(qe_k=2, qe_alpha=3))  # queries normalised here
    v = q[0] + 0.96**3 * HAND[0] + 0.936**3 * HAND[1]
    np.testing.assert_allclose(got[0], v / np.linalg.norm(v), atol=1e-6)
    queries = np.array([[0.96, 0.28], [-0.6, 0.8], [0.28, 0.96], [1.0, -0.2]], np.float32)
    for k, alpha in [(0, 3.0), (1, 3.0), (2, 3.0), (3, 1.0), (10, 3.0)]:
        params = RerankParams(qe_k=k, qe_alpha=alpha)
        np.testing.assert_allclose(alpha_query_expansion(queries, HAND, params),
                                   aqe_reference(queries, HAND, k, alpha), atol=1e-6, err_msg=f"k={k}")
    # Against a DomainIndex (its own search + reconstruct) the result is the same as against the array.
    g, q = clustered(400, seed=3), clustered(20, seed=4)
    index = DomainIndex.build(g, make_items(400), "photo", "hash-a")
    np.testing.assert_allclose(alpha_query_expansion(q, index, DEFAULT_RERANK),
                               aqe_reference(q, g, DEFAULT_RERANK.qe_k, DEFAULT_RERANK.qe_alpha), atol=1e-5)
    np.testing.assert_allclose(alpha_query_expansion(q, ArrayGallery(g), DEFAULT_RERANK),
                               alpha_query_expansion(q, index, DEFAULT_RERANK), atol=1e-6)


def test_knn_graph_self_first_and_k_larger_than_gallery() -> None:
    sims, ids = knn_graph(HAND, 10)
    assert sims.shape == ids.shape == (4, 4) and sims.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[:, 0], np.arange(4))
    np.testing.assert_array_equal(ids[0], [0, 1, 2, 3])
    np.testing.assert_allclose(sims[0], [1.0, 0.8, 0.6, 0.0], atol=1e-6)
    dup = np.repeat(HAND[:1], 3, axis=0)  # identical vectors tie with themselves: each still comes first
    np.testing.assert_array_equal(knn_graph(dup, 2)[1][:, 0], [0, 1, 2])
    one = HAND[:1]
    assert knn_graph(one, 10)[1].tolist() == [[0]]
    np.testing.assert_allclose(database_side_augmentation(one, DEFAULT_RERANK), one)
    np.testing.assert_allclose(alpha_query_expansion(HAND[1:2], one, DEFAULT_RERANK),
                               aqe_reference(HAND[1:2], one, 10, 3.0), atol=1e-6)
    np.testing.assert_allclose(augment_new_items(HAND[1:], ArrayGallery(one), DEFAULT_RERANK),
                               aqe_reference(HAND[1:], one, 9, 3.0), atol=1e-6)
    with pytest.raises(ValueError, match="L2-normalised"):
        knn_graph(HAND * 2, 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(HAND, 0)


def test_approximate_knn_graph_recall_vs_exact() -> None:
    x = clustered(3000, seed=5)
    _, exact = knn_graph(x, 10)
    _, hnsw = knn_graph(x, 10, exact_max=1000)  # above the limit: a temporary HNSW graph
    index = DomainIndex.build(x, make_items(3000), "photo", "hash-a", "ivf")
    _, ivf = knn_graph(x, 10, exact_max=1000, search=index.search)  # reuse an index's search
    for approx in (hnsw, ivf):
        np.testing.assert_array_equal(approx[:, 0], np.arange(3000))
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact, strict=True)])
        assert recall >= 0.95
    # DBA from the approximate graph is close to the exact DBA.
    params = RerankParams(dba_k=10)
    approx_dba = database_side_augmentation(x, params, graph=knn_graph(x, 10, exact_max=1000))
    cos = np.einsum("nd,nd->n", approx_dba, database_side_augmentation(x, params))
    assert np.median(cos) > 0.9999 and cos.min() > 0.95


# -- indexes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_index_with_rerank_round_trip(tmp_path: Path, index_type: str) -> None:
    x, q = clustered(600, seed=6), clustered(15, seed=7)
    params = RerankParams(dba_k=5, dba_power=2.0, qe_k=4, qe_alpha=1.5)
    index = DomainIndex.build(x, make_items(600), "photo", "hash-a", index_type, rerank=params, use_gpu=False)
    assert index.rerank == params and index.manifest["dba_graph"] == "exact"
    dba = database_side_augmentation(x, params)
    stored = index.reconstruct(np.arange(600))
    if index_type == "ivfpq":  # compressed: approximate vectors
        assert np.median(np.einsum("nd,nd->n", stored, dba)) > 0.8
    else:
        np.testing.assert_allclose(stored, dba, atol=1e-6)
    before = index.search(alpha_query_expansion(q, index, params), 10)
    loaded = DomainIndex.load(index.save(tmp_path / "photo"), use_gpu=False)
    manifest = json.loads((tmp_path / "photo" / MANIFEST_FILE).read_text())
    assert manifest["rerank"] == params.to_dict() and loaded.rerank == params
    after = loaded.search(alpha_query_expansion(q, loaded, params), 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_add_to_reranked_index_uses_existing_neighbours(tmp_path: Path) -> None:
    x = clustered(300, seed=8)
    params = RerankParams(dba_k=4, dba_power=3.0)
    index = DomainIndex.build(x[:290], make_items(290), "photo", "hash-a", rerank=params)
    stored = index.reconstruct(np.arange(290))
    index.add(x[290:], make_items(10, start=290))
    np.testing.assert_allclose(index.reconstruct(np.arange(290)), stored)  # existing vectors untouched
    # New vector = itself + its 3 nearest stored (augmented) vectors, weighted by similarity³.
    np.testing.assert_allclose(index.reconstruct(np.arange(290, 300)),
                               aqe_reference(x[290:], stored, 3, 3.0), atol=1e-5)
    plain = DomainIndex.build(x[:290], make_items(290), "photo", "hash-a")
    plain.add(x[290:], make_items(10, start=290))
    np.testing.assert_allclose(plain.reconstruct(np.arange(290, 300)), x[290:], atol=1e-6)
    assert DomainIndex.load(index.save(tmp_path / "p")).rerank == params


def test_index_without_rerank_key_loads_as_plain(tmp_path: Path) -> None:
    x = clustered(50, seed=9)
    folder = DomainIndex.build(x, make_items(50), "photo", "hash-a").save(tmp_path / "photo")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["rerank"] is None
    old = {k: v for k, v in manifest.items() if k not in ("rerank", "dba_graph")}  # as written before re-ranking
    (folder / MANIFEST_FILE).write_text(json.dumps(old))
    loaded = DomainIndex.load(folder)
    assert loaded.rerank is None
    np.testing.assert_array_equal(loaded.search(x[:3], 1)[1][:, 0], [0, 1, 2])
    (folder / MANIFEST_FILE).write_text(json.dumps({**old, "rerank": {"dba_k": 0}}))
    with pytest.raises(IndexFileError, match="bad 'rerank' entry.*dba_k"):
        DomainIndex.load(folder)
    with pytest.raises(ValueError, match="RerankParams"):
        DomainIndex.build(x, make_items(50), "photo", "hash-a", rerank={"dba_k": 3})  # type: ignore[arg-type]
    with pytest.raises(QueryError, match=r"ids must be integers in \[0, 50\)"):
        loaded.reconstruct([50])


# -- Retriever, evaluate, CLI on the demo data -----------------------------------------------------------------


@pytest.fixture(scope="module")
def reranked_run(indexed_run: Path, tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """A copy of the plain ``indexed_run`` re-indexed with the default re-ranking (embeddings from disk)."""
    run = tmp_path_factory.mktemp("reranked") / "run"
    shutil.copytree(indexed_run, run)
    build_indexes(run, demo_root, **FAST, rerank=DEFAULT_RERANK)
    return run


@pytest.fixture(scope="module")
def retriever(reranked_run: Path) -> Retriever:
    return Retriever.from_run(reranked_run, device="cpu")


def _ids(results: list[Any]) -> list[tuple[str, int]]:
    return [(r.domain, r.item_id) for r in results]


def test_retriever_expands_per_target_domain(retriever: Retriever) -> None:
    assert retriever.info()["rerank"] == DEFAULT_RERANK.to_dict()
    path = retriever.indexes["ink"].items[4].path
    q = retriever.encode(path)[None, :]
    for t in ("outline", "photo"):
        index = retriever.indexes[t]
        assert index.rerank == DEFAULT_RERANK and index.manifest["dba_graph"] == "exact"
        scores, ids = index.search(alpha_query_expansion(q, index, DEFAULT_RERANK), 8)
        got = retriever.search(path, t, k=8)
        assert [r.item_id for r in got] == ids[0].tolist()
        np.testing.assert_allclose([r.score for r in got], scores[0], atol=1e-5)  # expanded-query scores
        plain_scores, plain_ids = index.search(q, 8)
        plain = retriever.search(path, t, k=8, rerank=False)
        assert [r.item_id for r in plain] == plain_ids[0].tolist()
        np.testing.assert_allclose([r.score for r in plain], plain_scores[0], atol=1e-5)
    # Several targets: each has its own expanded query; the merge is the best k of the per-domain results,
    # by calibrated score (see cdretrieval.retrieval.merge_calibrated).
    both = retriever.search(path, ["outline", "photo"], k=10)
    union = retriever.search(path, "outline", k=10) + retriever.search(path, "photo", k=10)
    best = sorted(union, key=lambda r: -(r.calibrated_score or 0.0))[:10]
    assert [(r.domain, r.item_id) for r in both] == [(r.domain, r.item_id) for r in best]
    batch = retriever.search_batch([path, retriever.indexes["ink"].items[9].path], "photo", k=5)
    assert _ids(batch[0]) == _ids(retriever.search(path, "photo", k=5))
    with pytest.raises(QueryError, match="rerank must be"):
        retriever.search(path, "photo", rerank="yes")  # type: ignore[arg-type]


def test_old_index_without_rerank_key_searches_plainly(indexed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(indexed_run, run)
    for manifest_path in (run / INDEX_DIR).glob(f"*/{MANIFEST_FILE}"):  # as written before re-ranking existed
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("rerank", "dba_graph")}))
    old = Retriever.from_run(run, device="cpu")
    assert old.info()["rerank"] is None
    path = old.indexes["ink"].items[2].path
    plain = old.search(path, "photo", k=6)
    assert _ids(plain) == _ids(old.search(path, "photo", k=6, rerank=False))
    q = old.encode(path)[None, :]
    assert [r.item_id for r in plain] == old.indexes["photo"].search(q, 6)[1][0].tolist()
    # rerank=True still expands queries (default params) over the plain gallery.
    forced = old.search(path, "photo", k=6, rerank=True)
    expected = old.indexes["photo"].search(alpha_query_expansion(q, old.indexes["photo"], DEFAULT_RERANK), 6)
    assert [r.item_id for r in forced] == expected[1][0].tolist()


def test_evaluate_with_rerank_equals_retriever(
    reranked_run: Path, retriever: Retriever, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []  # (queries, gallery) that evaluate scores, per pair
    original = metrics.evaluate_pair

    def spy(query_emb: Any, query_labels: Any, gallery_emb: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((np.asarray(query_emb), np.asarray(gallery_emb)))
        return original(query_emb, query_labels, gallery_emb, *args, **kwargs)

    monkeypatch.setattr(metrics, "evaluate_pair", spy)
    k = 5
    result = evaluate(demo_root, "ink,photo", run_dir=reranked_run, ks=(1, k), rerank=DEFAULT_RERANK, **FAST)
    assert result["rerank"] == DEFAULT_RERANK.to_dict()
    pair = result["pairs"][0]
    assert (pair["query"], pair["gallery"]) == ("ink", "photo")
    expanded, gallery = seen[0]  # ink → photo, 120 queries
    np.testing.assert_allclose(gallery, retriever.indexes["photo"].reconstruct(np.arange(120)), atol=1e-5)
    _, order = metrics.rank_gallery(expanded, gallery)

    ink = retriever.indexes["ink"].items
    served = retriever.search_batch([it.path for it in ink], "photo", k=k)  # what a user gets, image by image
    got = np.array([[r.item_id for r in hits] for hits in served])  # [120, k]
    want = order[:, :k]
    # The untrained head crowds the demo images (cosines ~0.99): FAISS's and numpy's float rounding may swap
    # two hits whose scores differ by ~1e-7; rank by rank, the scores must agree.
    sims = expanded @ gallery.T  # [120, 120], evaluate's scores
    np.testing.assert_allclose(np.take_along_axis(sims, got, 1), np.take_along_axis(sims, want, 1), atol=1e-5)
    assert (got == want).all(axis=1).mean() >= 0.95
    same_sets = all(set(a) == set(b) for a, b in zip(got.tolist(), want.tolist(), strict=True))
    photo_labels = np.array([it.label for it in retriever.indexes["photo"].items])
    hits = [sum(r.label == it.label for r in res) / min(k, int((photo_labels == it.label).sum()))
            for it, res in zip(ink, served, strict=True)]
    assert pair[f"P@{k}"] == pytest.approx(float(np.mean(hits)), abs=1e-9 if same_sets else 0.01)
    plain = evaluate(demo_root, "ink,photo", run_dir=reranked_run, ks=(1, k), **FAST)
    assert plain["rerank"] is None and plain["pairs"][0]["mAP"] != pair["mAP"]


def test_evaluate_domains_rerank_on_random_data() -> None:
    emb = {"a": clustered(80, seed=10) * 3.0, "b": clustered(90, seed=11)}  # "a" is not normalised
    labels = {d: np.arange(len(e)) % 5 for d, e in emb.items()}
    out = metrics.evaluate_domains(emb, labels, ks=(1, 5), rerank=RerankParams(dba_k=3, qe_k=2))
    g = database_side_augmentation(l2_normalize(emb["b"]), RerankParams(dba_k=3))
    q = aqe_reference(emb["a"], g, 2, 3.0)
    want = metrics.evaluate_pair(q, labels["a"], g, labels["b"], ks=(1, 5))
    for key in ("P@1", "P@5", "mAP"):
        assert out["pairs"][0][key] == pytest.approx(want[key], abs=1e-9)
    with pytest.raises(QueryError, match="RerankParams"):
        metrics.evaluate_domains(emb, labels, rerank={"qe_k": 2})  # type: ignore[arg-type]


def test_cli_rerank_options(reranked_run: Path, retriever: Retriever, demo_root: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = retriever.indexes["ink"].items[7].path
    search = ["search", "--run", str(reranked_run), "--query", path, "--target", "photo", "-k", "5", "--json",
              "--device", "cpu"]
    assert main([*search, "--no-rerank"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]["results"]
    assert [r["item_id"] for r in plain] == [r.item_id for r in retriever.search(path, "photo", k=5, rerank=False)]
    assert main(search) == 0  # searches as the index was built: re-ranked
    default = json.loads(capsys.readouterr().out)[0]["results"]
    assert [r["item_id"] for r in default] == [r.item_id for r in retriever.search(path, "photo", k=5)]

    run = tmp_path / "run"
    shutil.copytree(reranked_run, run)
    cpu = ["--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", "--dba-k", "5",
                 "--qe-alpha", "1", *cpu]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] == {"dba_k": 5, "dba_power": 3.0, "qe_k": 20, "qe_alpha": 1.0}
    assert IndexSet.load(run / INDEX_DIR)["photo"].rerank == RerankParams(dba_k=5, qe_alpha=1.0)
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", "--no-rerank",
                 *cpu]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] is None
    assert IndexSet.load(run / INDEX_DIR)["photo"].rerank is None
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", "--rerank",
                 *cpu]) == 0  # --rerank alone: the defaults
    assert json.loads(capsys.readouterr().out)["rerank"] == DEFAULT_RERANK.to_dict()
    assert main(["index", "--run", str(run), "--data", str(demo_root), "--domains", "ink,photo", *cpu]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] is None  # plain by default
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(demo_root), "--domains", "ink,photo", "--run", str(run), "--ks", "1",
                 "--qe-k", "3", "--json", str(out), *cpu]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["rerank"] == RerankParams(qe_k=3).to_dict()
    for argv in (["index", "--run", str(run), "--domains", "photo", "--add", path, "--no-rerank"],
                 ["index", "--run", str(run), "--data", "d", "--no-rerank", "--dba-k", "3"],
                 ["evaluate", "--data", "d", "--qe-alpha", "-1"],
                 ["index", "--run", "r", "--data", "d", "--dba-k", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err
