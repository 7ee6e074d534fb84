"""Per-domain FAISS indexes: approximate search against exact search, persistence, validation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest

from cdretrieval.errors import DataError, IndexFileError, IndexMismatchError, QueryError
from cdretrieval.index import (
    INDEX_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    DomainIndex,
    IndexSet,
    Item,
    choose_index_type,
    estimate_index_mb,
    safe_domain_name,
)

DIM = 32


def clustered(n: int, seed: int, n_centres: int = 30, spread: float = 0.35) -> np.ndarray:
    """[n, DIM] points around shared random centres (the centres come from a fixed seed)."""
    centres = np.random.default_rng(1234).standard_normal((n_centres, DIM))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_centres, n)] + spread * rng.standard_normal((n, DIM))
    return x.astype(np.float32)


def make_items(n: int, domain: str = "photo", start: int = 0) -> list[Item]:
    return [
        Item(f"{domain}/c{i % 7}/img{i}.png", domain, f"c{i % 7}", 64, 48) for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(3000, seed=0), clustered(200, seed=1)


@pytest.fixture(scope="module")
def flat(data: tuple[np.ndarray, np.ndarray]) -> DomainIndex:
    x, _ = data
    return DomainIndex.build(x, make_items(len(x)), "photo", "hash-a")


@pytest.fixture(scope="module")
def built(data: tuple[np.ndarray, np.ndarray]) -> dict[str, DomainIndex]:
    """Cache of default-parameter indexes over ``data``, shared by tests that only read them."""
    return {}


def default_index(built: dict[str, DomainIndex], x: np.ndarray, index_type: str) -> DomainIndex:
    if index_type not in built:
        built[index_type] = DomainIndex.build(x, make_items(len(x)), "photo", "hash-a", index_type)
    return built[index_type]


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth, strict=True)]))


def test_flat_is_exact_cosine(data: tuple[np.ndarray, np.ndarray], flat: DomainIndex) -> None:
    x, q = data
    scores, ids = flat.search(q, 10)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, ids, axis=1), scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    # Queries are L2-normalised, so scale doesn't matter.
    np.testing.assert_array_equal(flat.search(q * 7.0, 10)[1], ids)


# Recall@10 against exact search on clustered data. ivf and hnsw use their defaults (measured ~0.99).
# IVFPQ is lossy by design: the default pq_m = dim/4 stores each 128-byte vector in 8 bytes and finds
# ~0.53 of the true top 10 here; pq_m = 16 (16 bytes) finds ~0.82.
@pytest.mark.parametrize(
    ("index_type", "options", "min_recall"),
    [("ivf", {}, 0.95), ("hnsw", {}, 0.95), ("ivfpq", {}, 0.45), ("ivfpq", {"pq_m": 16}, 0.75)],
)
def test_approximate_recall_vs_flat(
    data: tuple[np.ndarray, np.ndarray],
    flat: DomainIndex,
    built: dict[str, DomainIndex],
    index_type: str,
    options: dict,
    min_recall: float,
) -> None:
    x, q = data
    if options:
        index = DomainIndex.build(x, make_items(len(x)), "photo", "hash-a", index_type, **options)
    else:
        index = default_index(built, x, index_type)
    assert index.index_type == index_type
    _, truth = flat.search(q, 10)
    _, ids = index.search(q, 10)
    assert recall_at(ids, truth) >= min_recall


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_save_load_gives_identical_results(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], built: dict[str, DomainIndex], index_type: str
) -> None:
    x, q = data
    items = make_items(len(x))
    if index_type == "ivf":  # also check that a non-default nprobe survives the round trip
        index = DomainIndex.build(x, items, "photo", "hash-a", index_type, nprobe=16)
    else:
        index = default_index(built, x, index_type)
    before = index.search(q, 10)
    index.save(tmp_path / "photo")
    assert sorted(p.name for p in (tmp_path / "photo").iterdir()) == [INDEX_FILE, ITEMS_FILE, MANIFEST_FILE]

    loaded = DomainIndex.load(tmp_path / "photo", expected_model_hash="hash-a", expected_dim=DIM)
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded.items == items
    manifest = json.loads((tmp_path / "photo" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["metric"] == "inner_product"
    assert (manifest["model_hash"], manifest["dim"], manifest["count"]) == ("hash-a", DIM, len(x))
    assert (manifest["index_type"], manifest["domain"]) == (index_type, "photo")
    assert {"created", "faiss_version", "params", "files"} <= set(manifest)
    if index_type == "ivf":
        assert manifest["params"]["nprobe"] == 16 and faiss.extract_index_ivf(loaded.index).nprobe == 16


def test_load_refuses_other_model_or_dim(tmp_path: Path, flat: DomainIndex) -> None:
    flat.save(tmp_path / "photo")
    with pytest.raises(IndexMismatchError, match=r"hash-a.*hash-b.*cdretrieval index --run"):
        DomainIndex.load(tmp_path / "photo", expected_model_hash="hash-b")
    with pytest.raises(IndexMismatchError, match=r"32-d.*64-d.*cdretrieval index --run"):
        DomainIndex.load(tmp_path / "photo", expected_dim=64)


def test_load_refuses_unknown_format_and_inconsistent_counts(tmp_path: Path, flat: DomainIndex) -> None:
    folder = flat.save(tmp_path / "photo")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFileError, match="format_version 99"):
        DomainIndex.load(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "count": 5}))
    with pytest.raises(IndexFileError, match="must agree"):
        DomainIndex.load(folder)


def test_corrupt_or_missing_files_give_clear_errors(tmp_path: Path, flat: DomainIndex) -> None:
    folder = flat.save(tmp_path / "photo")
    index_bytes = (folder / INDEX_FILE).read_bytes()

    flipped = bytearray(index_bytes)
    flipped[len(flipped) // 2] ^= 0xFF
    (folder / INDEX_FILE).write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="corrupt"):
        DomainIndex.load(folder)

    (folder / INDEX_FILE).write_bytes(index_bytes[:100])
    with pytest.raises(IndexFileError, match="corrupt"):
        DomainIndex.load(folder, verify_checksums=False)  # the size check still catches truncation

    (folder / INDEX_FILE).unlink()
    with pytest.raises(IndexFileError, match=r"index\.faiss is missing"):
        DomainIndex.load(folder)

    flat.save(folder)  # repair, then break the item table
    (folder / ITEMS_FILE).write_text("not json\n")
    with pytest.raises(IndexFileError, match="corrupt"):
        DomainIndex.load(folder)

    (folder / MANIFEST_FILE).write_text("{truncated")
    with pytest.raises(IndexFileError, match="cannot read"):
        DomainIndex.load(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(IndexFileError, match=r"no manifest\.json"):
        DomainIndex.load(folder)
    with pytest.raises(IndexFileError, match="no index folder"):
        DomainIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_add_then_search_finds_new_items(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], index_type: str
) -> None:
    x, _ = data
    index = DomainIndex.build(x[:2000], make_items(2000), "photo", "hash-a", index_type)
    new = x[2000:2010]
    index.add(new, make_items(10, start=2000))
    assert len(index) == len(index.items) == index.manifest["count"] == 2010
    scores, ids = index.search(new, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(2000, 2010))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.items[2005].path == "photo/c3/img2005.png"
    index.add(np.empty((0, DIM), np.float32), [])  # no-op
    loaded = DomainIndex.load(index.save(tmp_path / "p"))
    assert len(loaded) == 2010
    with pytest.raises(DataError, match="dim 16"):
        index.add(new[:, :16], make_items(10, start=2010))
    with pytest.raises(DataError, match="2 items"):
        index.add(new, make_items(2, start=2010))


def test_search_k_and_query_validation(flat: DomainIndex) -> None:
    x = clustered(5, seed=3)
    small = DomainIndex.build(x, make_items(5), "photo", "hash-a")
    scores, ids = small.search(x[:2], 50)  # k > N -> N results
    assert scores.shape == ids.shape == (2, 5) and sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]
    assert small.search(x[0], 3)[1].shape == (1, 3)  # a single [D] query
    assert small.search(np.empty((0, DIM)), 3)[1].shape == (0, 3)
    for bad_k in (0, -1, True, 2.0):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            small.search(x, bad_k)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match=r"dim 16.*dim 32"):
        small.search(np.ones((2, 16), np.float32), 3)
    with pytest.raises(QueryError, match="all zeros"):
        small.search(np.zeros((1, DIM)), 3)
    with pytest.raises(QueryError, match="NaN"):
        small.search(np.full((1, DIM), np.nan), 3)


def test_build_validation() -> None:
    x = clustered(50, seed=4)
    with pytest.raises(DataError, match="no embeddings"):
        DomainIndex.build(np.empty((0, DIM), np.float32), [], "empty", "hash-a")
    with pytest.raises(DataError, match="49 items"):
        DomainIndex.build(x, make_items(49), "photo", "hash-a")
    with pytest.raises(DataError, match="domain 'sketch'"):
        DomainIndex.build(x, make_items(50, domain="sketch"), "photo", "hash-a")
    bad = x.copy()
    bad[7, 3] = np.inf
    with pytest.raises(DataError, match="row 7"):
        DomainIndex.build(bad, make_items(50), "photo", "hash-a")
    with pytest.raises(ValueError, match="unknown index_type"):
        DomainIndex.build(x, make_items(50), "photo", "hash-a", "lsh")
    # Too few vectors to train what was asked for: a clear error, no silent fallback.
    with pytest.raises(DataError, match="ivfpq needs at least 256"):
        DomainIndex.build(x, make_items(50), "photo", "hash-a", "ivfpq")
    with pytest.raises(DataError, match="nlist=100"):
        DomainIndex.build(x, make_items(50), "photo", "hash-a", "ivf", nlist=100)
    with pytest.raises(ValueError, match="pq_m=5"):
        DomainIndex.build(clustered(300, 5), make_items(300), "photo", "hash-a", "ivfpq", pq_m=5)
    # A tiny domain still gets a (single-list) IVF with the default nlist.
    tiny = DomainIndex.build(x, make_items(50), "photo", "hash-a", "ivf")
    assert tiny.manifest["params"]["nlist"] == 1 and tiny.search(x[:1], 1)[1][0, 0] == 0
    with pytest.raises(DataError, match=r"Item\.label"):
        Item("a.png", "photo", 3)  # type: ignore[arg-type]


def test_auto_rule() -> None:
    assert choose_index_type(1_000, 256) == "flat"
    assert choose_index_type(50_000, 256) == "flat"
    assert choose_index_type(50_001, 256) == "hnsw"
    assert choose_index_type(1_000_000, 256) == "hnsw"
    assert choose_index_type(1_000_001, 256) == "ivf"
    flat_mb = estimate_index_mb("flat", 100_000, 256)
    hnsw_mb = estimate_index_mb("hnsw", 100_000, 256)
    # Vectors fit but the HNSW graph does not: ivf. Flat does not fit: ivfpq.
    assert choose_index_type(100_000, 256, memory_budget_mb=(flat_mb + hnsw_mb) / 2) == "ivf"
    assert choose_index_type(100_000, 256, memory_budget_mb=flat_mb / 2) == "ivfpq"
    assert choose_index_type(10_000, 256, memory_budget_mb=flat_mb / 2) == "flat"  # 10k fits in half
    with pytest.raises(ValueError, match="no index type fits"):
        choose_index_type(100, 256, memory_budget_mb=0.001)
    x = clustered(300, seed=6)
    built = DomainIndex.build(x, make_items(300), "photo", "hash-a", "auto")
    assert built.index_type == "flat" and built.manifest["requested_index_type"] == "auto"
    x = clustered(2000, seed=6)  # flat ~0.24 MiB, ivfpq ~0.07 MiB
    squeezed = DomainIndex.build(x, make_items(2000), "photo", "hash-a", "auto", memory_budget_mb=0.1)
    assert squeezed.index_type == "ivfpq"


def test_index_set_roundtrip_and_unknown_domain(tmp_path: Path) -> None:
    domains = ["photo", "Real World", "Real_World"]
    emb = {d: clustered(40, seed=i) for i, d in enumerate(domains)}
    items = {d: make_items(40, domain=d) for d in domains}
    index_set = IndexSet.build(emb, items, "hash-a")
    assert index_set.domains == domains and index_set.dim == DIM
    root = index_set.save(tmp_path / "indexes")
    assert len({safe_domain_name(d) for d in domains}) == 3 and safe_domain_name("photo") == "photo"

    loaded = IndexSet.load(root, expected_model_hash="hash-a", expected_dim=DIM)
    assert loaded.domains == domains and "Real World" in loaded
    for d in domains:
        q = emb[d][:3]
        np.testing.assert_array_equal(loaded[d].search(q, 4)[1], index_set[d].search(q, 4)[1])
        assert loaded[d].items == items[d]
    with pytest.raises(QueryError, match=r"'sketch'.*'photo', 'Real World', 'Real_World'"):
        loaded["sketch"]
    with pytest.raises(IndexMismatchError, match="cdretrieval index --run"):
        IndexSet.load(root, expected_model_hash="hash-b")
    with pytest.raises(IndexFileError, match="no index set"):
        IndexSet.load(tmp_path)
    with pytest.raises(DataError, match="must match"):
        IndexSet.build(emb, {"photo": items["photo"]}, "hash-a")


def test_use_gpu_true_without_gpu_warns_and_uses_cpu() -> None:
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    x = clustered(20, seed=7)
    with pytest.warns(UserWarning, match="no GPU"):
        index = DomainIndex.build(x, make_items(20), "photo", "hash-a", use_gpu=True)
    assert not index.on_gpu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not DomainIndex.build(x, make_items(20), "photo", "hash-a").on_gpu  # "auto" is silent


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")
@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq"])
def test_gpu_search_matches_cpu(tmp_path: Path, data: tuple[np.ndarray, np.ndarray], index_type: str) -> None:
    x, q = data
    gpu = DomainIndex.build(x, make_items(len(x)), "photo", "hash-a", index_type)
    cpu = DomainIndex.load(gpu.save(tmp_path / "p"), use_gpu=False)
    assert gpu.on_gpu and not cpu.on_gpu
    _, ids_gpu = gpu.search(q, 10)
    _, ids_cpu = cpu.search(q, 10)
    assert recall_at(ids_gpu, ids_cpu) >= (0.99 if index_type != "ivfpq" else 0.8)
    assert DomainIndex.load(tmp_path / "p").on_gpu  # the saved CPU index moves to GPU on load


# ---------------------------------------------------------------------------------------------------------
# Normalisation in blocks (no float64 copy of the whole array) gives exactly the vectors it gave before


def _normalised_before(a: np.ndarray) -> np.ndarray:
    """The earlier ``normalised_rows``: one float64 copy of everything, divided by its float64 norms."""
    a64 = a.astype(np.float64)
    return np.ascontiguousarray(a64 / np.linalg.norm(a64, axis=1, keepdims=True), dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_normalised_rows_in_blocks_equal_the_whole_array_version(dtype: type) -> None:
    """Bit for bit, across block boundaries, with float32 values whose squares overflow float32."""
    from cdretrieval.index import NORMALISE_CHUNK, normalised_blocks, normalised_rows

    rng = np.random.default_rng(0)
    n = 2 * NORMALISE_CHUNK + 123
    a = (rng.standard_normal((n, 24)) * 100).astype(dtype)
    if dtype in (np.float32, np.float64):
        a[5] *= 1e30  # ‖row‖² overflows float32
    want = _normalised_before(a)
    got = normalised_rows(a, "x", DataError)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)
    blocks = list(normalised_blocks(a, "x", DataError, chunk=1000))
    assert [s for s, _ in blocks] == list(range(0, n, 1000))
    assert np.array_equal(np.concatenate([b for _, b in blocks]), want)
    assert np.array_equal(normalised_rows(a.T.copy().T, "x", DataError), want)  # Fortran order in, same out


def test_normalised_rows_report_the_bad_row_past_the_first_block() -> None:
    from cdretrieval.index import NORMALISE_CHUNK, normalised_rows

    a = np.ones((NORMALISE_CHUNK + 10, 8), np.float32)
    a[NORMALISE_CHUNK + 3, 2] = np.nan
    with pytest.raises(DataError, match=f"row {NORMALISE_CHUNK + 3} contains NaN"):
        normalised_rows(a, "x", DataError)
    a[NORMALISE_CHUNK + 3] = 0
    with pytest.raises(DataError, match=f"row {NORMALISE_CHUNK + 3} is all zeros"):
        normalised_rows(a, "x", DataError)
    with pytest.raises(DataError, match="numeric"):
        normalised_rows(np.array([["a", "b"]]), "x", DataError)
    assert normalised_rows(np.zeros((0, 4), np.float32), "x", DataError).shape == (0, 4)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_build_stores_the_same_unit_vectors_and_leaves_the_input_alone(index_type: str) -> None:
    """Building adds the rows normalised block by block: the stored vectors are exactly the earlier
    normalisation's, and the caller's array is not modified."""
    from cdretrieval.index import NORMALISE_CHUNK

    rng = np.random.default_rng(1)
    n = NORMALISE_CHUNK + 500
    a = (rng.standard_normal((n, 16)) * 3).astype(np.float32)
    before = a.copy()
    items = [Item(f"p/{i}.png", "d") for i in range(n)]
    idx = DomainIndex.build(a, items, "d", "h", index_type, nlist=32, use_gpu=False)
    assert np.array_equal(a, before)
    rows = np.arange(0, n, 97)
    assert np.array_equal(idx.reconstruct(rows), _normalised_before(a)[rows])
    bad = a.copy()
    bad[n - 1] = 0
    with pytest.raises(DataError, match=f"row {n - 1} is all zeros"):
        DomainIndex.build(bad, items, "d", "h", index_type, nlist=32, use_gpu=False)
