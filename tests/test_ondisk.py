"""On-disk IVF indexes (issue 15): sharded + merged == in-memory IVF with the same quantiser, memory-mapped
loading in another process, clear errors for a missing or foreign lists file, the auto rule, 2 gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from cdretrieval.errors import DataError, IndexFileError, QueryError
from cdretrieval.index import (
    IVFDATA_FILE,
    MANIFEST_FILE,
    ONDISK_TYPE,
    DomainIndex,
    IndexSet,
    Item,
    choose_index_type,
    estimate_index_mb,
)
from cdretrieval.ondisk import OnDiskParams, array_shards, build_ondisk_index, verify_ivfdata
from cdretrieval.rerank import RerankParams

REPO = Path(__file__).resolve().parents[1]
DIM, N = 32, 3000
PARAMS = OnDiskParams(nlist=20, nprobe=4, eval_queries=100)


def clustered(n: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(30, size=n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, domain: str = "photo") -> list[Item]:
    return [Item(f"/data/{domain}/{i}.png", domain, str(i % 7)) for i in range(n)]


def build(folder: Path, x: np.ndarray, shard_rows: int = 1100, params: OnDiskParams = PARAMS) -> DomainIndex:
    build_ondisk_index(folder, array_shards(x, items(len(x)), shard_rows), len(x), DIM, "photo", "hash-a", params)
    return DomainIndex.load(folder, "hash-a", DIM, use_gpu=False)


def in_memory_twin(ondisk: DomainIndex, x: np.ndarray) -> faiss.IndexIVFFlat:
    """An in-memory IVF-flat index with the on-disk index's trained quantiser (kept alive by FAISS), holding
    ``x`` in id order."""
    ivf = faiss.extract_index_ivf(ondisk.index)
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    twin = faiss.IndexIVFFlat(quantizer, DIM, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    twin.is_trained = True
    twin.add(x)
    twin.nprobe = ivf.nprobe
    return twin


def test_sharded_merged_index_equals_in_memory_ivf(tmp_path: Path) -> None:
    x = clustered(N, seed=1)
    ondisk = build(tmp_path / "idx", x)  # 3 shards: 1100 + 1100 + 800
    q = clustered(50, seed=2)
    scores, ids = ondisk.search(q, 10)
    want_scores, want_ids = in_memory_twin(ondisk, x).search(q, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert ondisk.items == items(N)  # ids run through the shards in order: id i is item i
    m = ondisk.manifest
    assert m["index_type"] == ONDISK_TYPE and m["count"] == N and m["params"] == {"nlist": 20, "nprobe": 4}
    assert m["ondisk"]["shards"] == [1100, 1100, 800] and m["ondisk"]["train_size"] == 1000
    assert m["ondisk"]["eval_queries"] == 100 and m["ondisk"]["recall"]["k"] == 10
    assert 0.9 <= m["ondisk"]["recall"]["recall"] <= 1.0
    assert ondisk.on_disk and ondisk.ivfdata_path == tmp_path / "idx" / IVFDATA_FILE
    assert not any(tmp_path.glob(".idx.shards*"))  # shard files removed after the merge
    assert verify_ivfdata(tmp_path / "idx")


def test_pq_codes_on_disk(tmp_path: Path) -> None:
    x = clustered(N, seed=3)
    params = OnDiskParams(nlist=20, nprobe=20, pq_m=8, train_size=N - 50, eval_queries=50)
    ondisk = build(tmp_path / "idx", x, params=params)
    assert ondisk.manifest["params"] == {"nlist": 20, "nprobe": 20, "pq_m": 8, "pq_nbits": 8}
    _, ids = ondisk.search(x[:20], 10)
    assert (ids >= 0).all() and (ids == np.arange(20)[:, None]).any(axis=1).mean() >= 0.8  # finds itself
    assert 0.2 <= ondisk.manifest["ondisk"]["recall"]["recall"] <= 1.0  # 8-byte codes: approximate
    assert (tmp_path / "idx" / IVFDATA_FILE).stat().st_size == N * (8 + 8)  # pq_m code bytes + 8-byte id


_BUILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from tests.test_ondisk import build, clustered, N
build(__import__("pathlib").Path(sys.argv[1]), clustered(N, seed=1))
"""


def test_loads_memory_mapped_after_the_build_process_is_gone(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _BUILD, str(folder), str(REPO)], env=env, check=True, timeout=120)
    moved = tmp_path / "moved"
    folder.rename(moved)  # the lists are found beside index.faiss, wherever the folder is
    (moved / IVFDATA_FILE).chmod(0o444)  # mapped read-only
    index = DomainIndex.load(moved, "hash-a", DIM, use_gpu=False)
    x = clustered(N, seed=1)
    _, ids = index.search(x[:30], 5)
    _, want = in_memory_twin(index, x).search(x[:30], 5)
    np.testing.assert_array_equal(ids, want)
    with pytest.raises(DataError, match="read-only"):
        index.add(x[:1], items(1))
    with pytest.raises(QueryError, match="reconstruct"):
        index.reconstruct([0])


def test_missing_or_foreign_lists_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    build(folder, clustered(N, seed=1))
    data = folder / IVFDATA_FILE
    data.rename(tmp_path / "aside")
    with pytest.raises(IndexFileError, match=r"index\.ivfdata is missing"):
        DomainIndex.load(folder)
    with open(tmp_path / "aside", "rb") as src:  # truncated
        data.write_bytes(src.read(1000))
    with pytest.raises(IndexFileError, match="truncated or from another build"):
        DomainIndex.load(folder)
    other = tmp_path / "other"
    build(other, clustered(N - 500, seed=4))
    shutil.copyfile(other / IVFDATA_FILE, data)  # another build's lists
    with pytest.raises(IndexFileError, match="truncated or from another build"):
        DomainIndex.load(folder)
    shutil.copyfile(tmp_path / "aside", data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][IVFDATA_FILE]["bytes"] = 5  # a manifest that does not match its files
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFileError, match="manifest records 5"):
        DomainIndex.load(folder)


def test_build_save_and_index_set_roundtrip(tmp_path: Path) -> None:
    x = clustered(N, seed=5)
    built = DomainIndex.build(x, items(N), "photo", "hash-a", ONDISK_TYPE, nlist=20, nprobe=5, use_gpu=False,
                              ondisk_dir=tmp_path / "work", shard_rows=1000)
    assert built.manifest["ondisk"]["shards"] == [1000, 1000, 1000]
    iset = IndexSet({"photo": built})
    iset.save(tmp_path / "set")
    iset.save(tmp_path / "set")  # replacing a saved set (the lists linked again) works too
    loaded = IndexSet.load(tmp_path / "set", "hash-a", use_gpu=False)
    np.testing.assert_array_equal(loaded["photo"].search(x[:10], 3)[1], built.search(x[:10], 3)[1])
    assert (tmp_path / "set" / "photo" / IVFDATA_FILE).stat().st_ino == built.ivfdata_path.stat().st_ino  # linked
    with pytest.raises(DataError, match="no re-ranking"):
        DomainIndex.build(x, items(N), "photo", "hash-a", ONDISK_TYPE, rerank=RerankParams())


def test_auto_picks_on_disk_above_a_million_when_ivf_does_not_fit() -> None:
    n, dim = 10_000_000, 256
    ivf_mb = estimate_index_mb("ivf", n, dim)
    assert estimate_index_mb(ONDISK_TYPE, n, dim) < 20  # centroids only: ~12.6k × 1 KiB
    assert choose_index_type(n, dim) == "ivf"
    assert choose_index_type(n, dim, memory_budget_mb=ivf_mb / 2) == ONDISK_TYPE
    assert choose_index_type(100_000, 256, memory_budget_mb=estimate_index_mb("flat", 100_000, 256) / 2) == "ivfpq"


_RANKS = """
import sys, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
dist.init_process_group("gloo")
from tests.test_ondisk import PARAMS, N, DIM, clustered, items
from cdretrieval.ondisk import array_shards, build_ondisk_index
x = clustered(N, seed=1)
build_ondisk_index(sys.argv[1], array_shards(x, items(N), 700), N, DIM, "photo", "hash-a", PARAMS)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_fill_the_shards_of_one_index(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), str(tmp_path / "two"), str(REPO)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = clustered(N, seed=1)
    one = build(tmp_path / "one", x, shard_rows=700)
    two = DomainIndex.load(tmp_path / "two", "hash-a", DIM, use_gpu=False)
    assert two.manifest["ondisk"]["shards"] == [700] * 4 + [200] and two.items == one.items
    np.testing.assert_array_equal(two.search(x[:40], 10)[1], one.search(x[:40], 10)[1])


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")
def test_coarse_kmeans_on_the_gpu_gives_a_cpu_index(tmp_path: Path) -> None:
    """With faiss-gpu the k-means runs on the GPU; the index written and served is an ordinary CPU index
    that finds each vector's own cluster-mates as well as a CPU-trained one does."""
    x = clustered(N, seed=1)
    idx = build(tmp_path / "g", x)
    ivf = faiss.extract_index_ivf(idx.index)
    assert ivf.clustering_index is None and ivf.ntotal == N and ivf.nlist == PARAMS.nlist
    _, ids = idx.search(x[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
