"""Pipeline: resumable embedding, index building and extension, evaluation (baseline, paired digits)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cdretrieval import loading
from cdretrieval.config import RunConfig
from cdretrieval.data.demo import DEMO_SIZE
from cdretrieval.data.images import is_image_file, load_image
from cdretrieval.data.transforms import eval_transform
from cdretrieval.domain_embeddings import EmbeddedDomain, embed_domains, embeddings_folder
from cdretrieval.embedding_chunks import PROGRESS_FILE, Chunk, ChunkStore
from cdretrieval.errors import CheckpointError, DataError, QueryError
from cdretrieval.evaluation import evaluate
from cdretrieval.index import IndexSet
from cdretrieval.indexing import add_to_index, build_indexes
from cdretrieval.loading import LoadedModel, load_model
from cdretrieval.models.runtime import RUNTIME_ENV, FrozenForward
from cdretrieval.retrieval import Retriever
from cdretrieval.run import EMBEDDINGS_DIR, INDEX_DIR, load_encoder, model_hash

FAST: dict[str, Any] = {"num_workers": 0, "progress": False, "device": "cpu"}



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One domain of 37 demo images (two classes) plus one corrupt file: chunks of 8 end mid-batch."""
    root = tmp_path_factory.mktemp("small") / "data"
    files = sorted((demo_root / "photo").rglob("*.png"))[:37]
    for f in files:
        target = root / "photo" / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (root / "photo" / files[0].parent.name / "zz_corrupt.png").write_bytes(b"not a png")
    return root


def _embed_small(run: Path, root: Path, **kw: Any) -> dict[str, EmbeddedDomain]:
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        return embed_domains(run, root, batch_size=5, chunk_size=8, **FAST, **kw)


def test_embedding_resumes_after_interruption(tiny_run: Path, small_root: Path, tmp_path: Path) -> None:
    full_run, broken_run = tmp_path / "full", tmp_path / "broken"
    shutil.copytree(tiny_run, full_run)
    shutil.copytree(tiny_run, broken_run)
    reference = _embed_small(full_run, small_root)["photo"]
    assert len(reference) == 37 and len(reference.skipped) == 1 and reference.skipped[0][0].endswith("zz_corrupt.png")
    assert reference.embeddings.shape == (37, 32) and reference.embeddings.dtype == np.float32
    size = DEMO_SIZE  # the item table records each file's own size (the demo's 128 px), not the model's 64
    assert all(it.width == size and it.height == size and it.label is not None for it in reference.items)

    class Stop(Exception):
        pass

    def stop_after_two(domain: str, i: int, done: int, total: int) -> None:
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        embed_domains(broken_run, small_root, batch_size=5, chunk_size=8, on_chunk=stop_after_two, **FAST)
    folder = embeddings_folder(broken_run / EMBEDDINGS_DIR, "photo", "head", None)
    assert json.loads((folder / PROGRESS_FILE).read_text())["chunks_done"] == 2

    computed: list[tuple[int, int]] = []
    resumed = _embed_small(broken_run, small_root, on_chunk=lambda d, i, done, n: computed.append((i, done)))["photo"]
    assert computed == [(2, 24), (3, 32), (4, 38)]  # only the rest: chunks 0 and 1 came from disk
    np.testing.assert_allclose(resumed.embeddings, reference.embeddings, atol=1e-6)
    assert resumed.items == reference.items and resumed.skipped == reference.skipped

    # A complete store is read back without any model work; resume=False recomputes everything.
    computed.clear()
    again = _embed_small(broken_run, small_root, on_chunk=lambda d, i, done, n: computed.append((i, done)))
    assert computed == [] and np.array_equal(again["photo"].embeddings, resumed.embeddings)
    _embed_small(broken_run, small_root, resume=False, on_chunk=lambda d, i, done, n: computed.append((i, done)))
    assert len(computed) == 5


def test_chunk_store_discards_other_keys_and_bad_chunks(tmp_path: Path) -> None:
    def chunk(start: int, stop: int) -> Chunk:
        n = stop - start
        return Chunk(start, stop, np.ones((n, 4), np.float32), np.arange(start, stop), np.full((n, 2), 9), [])

    store = ChunkStore(tmp_path, {"model_hash": "a", "samples": "s"}, n_samples=10, chunk_size=4, dim=4)
    for i in range(3):
        store.write(i, chunk(*store.bounds(i)))
    assert [c.stop for c in store.completed()] == [4, 8, 10]
    (tmp_path / "chunk_000001.npz").write_bytes(b"garbage")  # a damaged middle chunk: recompute from it
    assert [c.stop for c in store.completed()] == [4]
    other = ChunkStore(tmp_path, {"model_hash": "b", "samples": "s"}, n_samples=10, chunk_size=4, dim=4)
    assert other.completed() == []
    assert not list(tmp_path.glob("chunk_*.npz")) and not (tmp_path / PROGRESS_FILE).exists()


def test_changed_model_or_samples_invalidate_chunks(tiny_run: Path, small_root: Path, tmp_path: Path) -> None:
    run, root = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_run, run)
    shutil.copytree(small_root, root)
    _embed_small(run, root)
    computed: list[int] = []

    def record(domain: str, i: int, done: int, total: int) -> None:
        computed.append(i)

    # Another image size gives other embeddings: every chunk is recomputed.
    with pytest.warns(UserWarning):
        embed_domains(run, root, batch_size=5, chunk_size=8, image_size=32, on_chunk=record, **FAST)
    assert computed == [0, 1, 2, 3, 4]
    # So does another sample list (one more image).
    computed.clear()
    first = next((root / "photo").rglob("*.png"))
    shutil.copy(first, first.parent / "zzz_extra.png")
    with pytest.warns(UserWarning):
        out = embed_domains(run, root, batch_size=5, chunk_size=8, image_size=32, on_chunk=record, **FAST)
    assert computed == [0, 1, 2, 3, 4] and len(out["photo"]) == 38


def test_baseline_embedding_without_run(small_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        out = embed_domains(None, small_root, image_size=32, batch_size=16, embeddings_dir=tmp_path, **FAST)
    e = out["photo"]
    assert e.feature == "backbone" and e.embeddings.shape == (37, 1280)
    np.testing.assert_allclose(np.linalg.norm(e.embeddings, axis=1), 1.0, atol=1e-4)
    assert (tmp_path / "photo" / "backbone" / PROGRESS_FILE).is_file()
    with pytest.raises(CheckpointError, match="needs a trained run"):
        embed_domains(None, small_root, feature="head", **FAST)


def test_build_indexes_records_provenance(indexed_run: Path, demo_root: Path) -> None:
    encoder, _ = load_encoder(indexed_run)
    iset = IndexSet.load(indexed_run / INDEX_DIR, expected_model_hash=model_hash(encoder), expected_dim=32)
    assert iset.domains == ["ink", "outline", "photo"]
    for d in iset:
        m = iset[d].manifest
        assert m["feature"] == "head" and m["data_root"] == str(demo_root.resolve()) and m["image_size"] == 64
        assert m["backbone"] == "efficientnet_lite0" and m["count"] == 120 and m["index_type"] == "flat"
    assert (indexed_run / EMBEDDINGS_DIR / "photo" / "head" / PROGRESS_FILE).is_file()


def test_rebuild_with_fewer_domains_and_other_type(indexed_run: Path, demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(indexed_run, run)
    before = IndexSet.load(run / INDEX_DIR)
    iset = build_indexes(run, demo_root, "ink,photo", index_type="hnsw", **FAST)  # embeddings come from disk
    # only the named domains are replaced: outline's index is kept as it was (and the detector, which knows it)
    assert iset.domains == ["ink", "outline", "photo"] and iset["ink"].index_type == "hnsw"
    loaded = IndexSet.load(run / INDEX_DIR)
    assert loaded.domains == ["ink", "outline", "photo"] and loaded["photo"].index_type == "hnsw"
    assert loaded["outline"].index_type == "flat" and loaded["outline"].items == before["outline"].items
    assert (loaded.detector is None) == (before.detector is None)
    with pytest.raises(DataError, match="memory_budget_mb"):
        build_indexes(run, demo_root, "ink", index_type="auto", memory_budget_mb=1e-6, **FAST)


def test_index_refuses_to_drop_an_empty_or_unreadable_domain(
    indexed_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(indexed_run, run)
    shutil.copytree(demo_root, data)
    encoder, _ = load_encoder(run)
    before = IndexSet.load(run / INDEX_DIR)
    shutil.rmtree(data / "outline")
    (data / "outline").mkdir()  # empty: list_domains would skip it silently
    with pytest.raises(DataError, match=r"outline.*has no images.*--domains"):
        build_indexes(run, data, **FAST)
    (data / "outline").rmdir()  # gone: the index still has it
    with pytest.raises(DataError, match=r"\['outline'\] are in the current index"):
        build_indexes(run, data, **FAST)
    (data / "outline").mkdir()
    (data / "outline" / "a.png").write_bytes(b"x")
    (data / "outline").chmod(0)
    try:
        if not os.access(data / "outline", os.R_OK):  # root reads everything
            with pytest.raises(DataError, match=r"outline.*cannot be read"):
                build_indexes(run, data, **FAST)
    finally:
        (data / "outline").chmod(0o755)
    after = IndexSet.load(run / INDEX_DIR, expected_model_hash=model_hash(encoder))
    assert after.domains == before.domains and after["outline"].items == before["outline"].items


def test_add_to_index_then_search(indexed_run: Path, demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(indexed_run, run)
    new = tmp_path / "new" / "7"
    new.mkdir(parents=True)
    src = next((demo_root / "ink").rglob("*.png"))
    Image.open(src).transpose(Image.Transpose.ROTATE_90).save(new / "rotated.png")
    (new / "broken.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1"):
        added = add_to_index(run, "photo", tmp_path / "new", **FAST)
    assert len(added.added) == 1 and added.total == 121 and len(added.skipped) == 1
    assert added.added[0].label == "7" and added.added[0].domain == "photo"
    again = add_to_index(run, "photo", [new / "rotated.png"], **FAST)
    assert again.added == [] and again.duplicates == [str(new / "rotated.png")] and again.total == 121

    r = Retriever.from_run(run, device="cpu")
    assert r.info()["counts"]["photo"] == 121
    top = r.search(new / "rotated.png", "photo", k=1)[0]
    assert top.path == str(new / "rotated.png") and top.item_id == 120 and top.score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(QueryError, match="unknown domain 'sketch'"):
        add_to_index(run, "sketch", new, **FAST)
    with pytest.raises(DataError, match="no such file"):
        add_to_index(run, "photo", tmp_path / "nothing-here", **FAST)


def test_evaluate_baseline_on_demo(demo_root: Path) -> None:
    result = evaluate(demo_root, None, image_size=64, ks=(1, 5), batch_size=60, **FAST)
    pairs = {(p["query"], p["gallery"]) for p in result["pairs"]}
    assert len(result["pairs"]) == 6 and all(a != b for a, b in pairs) and len(pairs) == 6
    for p in result["pairs"]:
        assert p["n_query"] == 120 and p["n_gallery"] == 120
        assert all(0.0 <= p[key] <= 1.0 for key in ("P@1", "P@5", "mAP"))
    assert set(result["mean"]) == {"P@1", "P@5", "mAP"}
    assert result["run"] is None and result["backbone"] == "efficientnet_lite0"
    assert result["feature"] == "backbone" and result["image_size"] == 64
    json.dumps(result)  # JSON-ready


def test_evaluate_paired_digits(digits_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "digits"
    src.mkdir()
    for name in ("mnist", "mnistm"):
        with np.load(digits_root / f"{name}.npz") as z:
            np.savez(src / f"{name}.npz", images=z["images"][:200], labels=z["labels"][:200])
    result = evaluate(src, "mnist,mnistm", image_size=32, ks=(1, 10), batch_size=100, **FAST)
    assert [(p["query"], p["gallery"]) for p in result["pairs"]] == [("mnist", "mnistm"), ("mnistm", "mnist")]
    for p in result["pairs"]:
        assert 0.0 <= p["R@1"] <= p["R@10"] <= 1.0 and 0.0 <= p["mAP"] <= 1.0
    assert result["mean"]["R@10"] > 0.05  # the paired image is found far above chance (10/200)


def test_evaluate_errors(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="at least two domains"):
        evaluate(demo_root, "photo", **FAST)
    with pytest.raises(QueryError, match="positive integer"):
        evaluate(demo_root, "ink,photo", ks=(0, 5), **FAST)
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tmp_path / "nope", "ink,photo", **FAST)
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(demo_root, "ink,photo", run_dir=tmp_path / "no-run", **FAST)


# ---------------------------------------------------------------------------------------------------------
# The backbone's runtime: ONNX Runtime on the CPU, numerically PyTorch's


def _real_images(root: Path, size: int, per_domain: int) -> torch.Tensor:
    """``per_domain`` images of each domain folder of ``root``, eval-transformed: ``[N, 3, size, size]``."""
    transform = eval_transform(size)
    files = [f for d in sorted(p for p in root.iterdir() if p.is_dir())
             for f in sorted(d.rglob("*"))[:200] if is_image_file(f.name)]
    by_domain: dict[str, list[Path]] = {}
    for f in files:
        by_domain.setdefault(f.relative_to(root).parts[0], []).append(f)
    picked = [f for fs in by_domain.values() for f in fs[:per_domain]]
    return torch.stack([transform(load_image(f)) for f in picked])


@pytest.mark.parametrize("how", ["env", "argument"])
def test_onnxruntime_embeddings_match_pytorch(
    tiny_run: Path, demo_root: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadedModel.embed under ONNX Runtime vs eager PyTorch on real images: ≤ 1e-4 apart, every feature."""
    pytest.importorskip("onnxruntime")
    x = _real_images(demo_root, 64, per_domain=8)  # [24, 3, 64, 64]
    models = {}
    for runtime in ("onnxruntime", "torch"):
        if how == "env":
            monkeypatch.setenv(RUNTIME_ENV, runtime)
            models[runtime] = load_model(tiny_run, device="cpu")
            assert models[runtime].backbone_forward().runtime == runtime  # the variable is read when it is built
        else:
            models[runtime] = load_model(tiny_run, device="cpu", runtime=runtime)
            assert models[runtime].backbone_forward().runtime == runtime
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    fast, eager = models["onnxruntime"], models["torch"]
    for feature in ("head", "backbone"):
        got, want = fast.with_feature(feature).embed(x), eager.with_feature(feature).embed(x)
        assert got.shape == want.shape == (24, fast.encoder.output_dim(feature)) and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= 1e-4, feature
        # the PyTorch path is Encoder.embed itself
        assert torch.equal(want, eager.encoder.embed(x, feature).float())
    # Both features from one pass are the features one at a time.
    head, backbone = fast.embed_features(x, ["head", "backbone"])
    assert torch.equal(head, fast.embed(x)) and torch.equal(backbone, fast.with_feature("backbone").embed(x))
    assert fast.input_settings() == (None, False)  # the graph runs fp32 NCHW


def test_onnxruntime_matches_pytorch_on_pacs(pacs_root: Path) -> None:
    """The same contract at the default image size on real photos, art, cartoons and sketches (baseline Lite0)."""
    pytest.importorskip("onnxruntime")
    x = _real_images(pacs_root, RunConfig().data.image_size, per_domain=4)
    fast = load_model(None, device="cpu", runtime="onnxruntime")
    eager = load_model(None, device="cpu", runtime="torch")
    got, want = fast.embed(x), eager.embed(x)
    assert got.shape == (16, 1280) and float((got - want).abs().max()) <= 1e-4


def test_embedding_pass_runs_the_chosen_runtime(tiny_run: Path, small_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """embed_domains (the indexing / evaluation pass) under either runtime: the same embeddings to 1e-4."""
    pytest.importorskip("onnxruntime")
    out = {}
    used: list[str] = []
    original = LoadedModel.backbone_forward

    def spy(self: LoadedModel) -> Any:
        fwd = original(self)
        used.append(fwd.runtime)
        return fwd

    monkeypatch.setattr(LoadedModel, "backbone_forward", spy)
    for runtime in ("onnxruntime", "torch"):
        monkeypatch.setenv(RUNTIME_ENV, runtime)
        used.clear()
        out[runtime] = _embed_small(tiny_run, small_root, embeddings_dir=tmp_path / runtime)["photo"]
        assert used and set(used) == {runtime}
    assert out["onnxruntime"].items == out["torch"].items
    np.testing.assert_allclose(out["onnxruntime"].embeddings, out["torch"].embeddings, atol=1e-4)


def test_backbone_forward_is_built_once_and_shared(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent first calls build one forward; with_feature copies share it; another image size gets its own."""
    model = load_model(tiny_run, device="cpu", runtime="torch")
    calls: list[int] = []

    def slow_build(module: Any, image_size: int, device: Any, *, runtime: str | None = None) -> FrozenForward:
        calls.append(image_size)
        time.sleep(0.2)  # long enough for every thread to arrive while the first one builds
        return FrozenForward("torch", "test", image_size, module)

    monkeypatch.setattr(loading, "frozen_forward", slow_build)
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: model.backbone_forward(), range(4)))
    assert calls == [64] and all(b is built[0] for b in built)
    assert model.with_feature("backbone").backbone_forward() is built[0] and calls == [64]
    assert dataclasses.replace(model, image_size=32).backbone_forward().image_size == 32 and calls == [64, 32]
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_model(tiny_run, device="cpu", runtime="tensorrt")
