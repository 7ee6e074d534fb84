"""ivf-ondisk indexes read straight from a domain's chunk store (issue 15): the same index as from the vectors
in memory, without ever holding the domain; shards already filled by a failed build are kept on rerun."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdretrieval.data.folders import Sample
from cdretrieval.domain_embeddings import StoredDomain
from cdretrieval.embedding_chunks import Chunk, ChunkStore
from cdretrieval.errors import DataError
from cdretrieval.index import DomainIndex, Item
from cdretrieval.ondisk import OnDiskParams, Shard, array_shards, build_ondisk_index

DIM, N, CHUNK = 64, 48_000, 1000
PARAMS = OnDiskParams(nlist=20, nprobe=4, eval_queries=100)


def _store(folder: Path) -> tuple[StoredDomain, np.ndarray, list[Item]]:
    """A complete chunk store of ``N`` samples (every 97th unreadable), opened lazily, and what it holds:
    the readable rows' vectors [n, D] and items, in order."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, DIM)).astype(np.float32)
    samples = [Sample(f"/data/photo/{i}.png", "photo", str(i % 7)) for i in range(N)]
    store = ChunkStore(folder, {"model_hash": "hash-a"}, N, CHUNK, DIM)
    vectors, items = [], []
    for c in range(store.n_chunks):
        start, stop = store.bounds(c)
        ok = np.array([i for i in range(start, stop) if i % 97], np.int64)
        x = centres[rng.integers(30, size=len(ok))] + 0.3 * rng.standard_normal((len(ok), DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sizes = np.tile([[64, 48]], (len(ok), 1))
        store.write(c, Chunk(start, stop, x, ok, sizes, [(i, "unreadable") for i in range(start, stop) if i % 97 == 0]))
        vectors.append(x)
        items += [Item(samples[i].path, "photo", samples[i].label, 64, 48) for i in ok.tolist()]
    stored = StoredDomain.open(store, "photo", samples, feature="head", model_hash="hash-a")
    return stored, np.concatenate(vectors), items


def test_index_from_the_chunk_store_equals_the_in_memory_one_without_holding_the_domain(tmp_path: Path) -> None:
    stored, x, items = _store(tmp_path / "store")
    assert len(stored) == len(x) == len(items) and len(stored.skipped) == -(-N // 97)
    assert stored.skipped[0] == ("/data/photo/0.png", "unreadable")
    shards = stored.shards(3000)  # 3 chunks each
    assert len(shards) == 16

    tracemalloc.start()
    try:
        build_ondisk_index(tmp_path / "streamed", shards, len(stored), DIM, "photo", "hash-a", PARAMS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 3, f"peak {peak / 2**20:.1f} MiB while streaming {x.nbytes / 2**20:.1f} MiB of vectors"

    build_ondisk_index(tmp_path / "memory", array_shards(x, items, 3000), len(x), DIM, "photo", "hash-a", PARAMS)
    streamed = DomainIndex.load(tmp_path / "streamed", "hash-a", DIM, use_gpu=False)
    memory = DomainIndex.load(tmp_path / "memory", "hash-a", DIM, use_gpu=False)
    assert streamed.items == memory.items == items  # id i is readable row i: bad images left out alike
    assert streamed.manifest["ondisk"]["shards"] == [sum(stored.rows[c : c + 3]) for c in range(0, 48, 3)]
    q = x[::500]
    got, want = streamed.search(q, 10), memory.search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert streamed.manifest["ondisk"]["recall"] == memory.manifest["ondisk"]["recall"]
    np.testing.assert_array_equal(stored.sample(50, seed=3), x[np.sort(np.random.default_rng(3).choice(len(x), 50,
                                                                                                        replace=False))])


def test_a_chunk_that_changed_since_the_store_was_opened_is_refused(tmp_path: Path) -> None:
    stored, _, _ = _store(tmp_path / "store")
    (stored.store.folder / "chunk_000003.npz").unlink()
    with pytest.raises(DataError, match="chunk 3 is missing"):
        build_ondisk_index(tmp_path / "idx", stored.shards(3000), len(stored), DIM, "photo", "hash-a", PARAMS)


class Counted:
    """A shard that counts its reads and raises on the ``fail_on``-th one (never when 0)."""

    def __init__(self, shard: Shard, fail_on: int = 0) -> None:
        self.shard, self.fail_on, self.calls = shard, fail_on, 0

    def __call__(self) -> Iterable[tuple[np.ndarray, Sequence[Any]]]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError("disk went away")
        return self.shard()


def _counted(x: np.ndarray, items: list[Item], fail: int = -1) -> list[Counted]:
    return [Counted(s, fail_on=2 if i == fail else 0) for i, s in enumerate(array_shards(x, items, 3000))]


def test_a_rerun_keeps_the_shards_a_failed_build_filled(tmp_path: Path) -> None:
    _, x, items = _store(tmp_path / "store")
    work = tmp_path / "work"

    def build(folder: Path, shards: list[Counted], params: OnDiskParams) -> Path:
        return build_ondisk_index(folder, shards, len(x), DIM, "photo", "hash-a", params, work_dir=work)

    failing = _counted(x, items, fail=2)  # pass 1 reads every shard, then the fill fails at shard 2
    with pytest.raises(OSError, match="disk went away"):
        build(tmp_path / "idx", failing, PARAMS)
    assert sorted(p.name for p in work.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]

    rerun = _counted(x, items)
    build(tmp_path / "idx", rerun, PARAMS)
    assert [s.calls for s in rerun] == [1, 1] + [2] * 14  # shards 0 and 1 only sampled, not filled again
    assert not work.exists()  # removed after the merge
    fresh = build_ondisk_index(tmp_path / "fresh", array_shards(x, items, 3000), len(x), DIM, "photo", "hash-a",
                               PARAMS)
    a, b = (DomainIndex.load(f, use_gpu=False) for f in (tmp_path / "idx", fresh))
    assert a.items == b.items
    np.testing.assert_array_equal(a.search(x[::700], 10)[1], b.search(x[::700], 10)[1])

    with pytest.raises(OSError):
        build(tmp_path / "idx2", _counted(x, items, fail=5), PARAMS)
    other = _counted(x, items)  # another training (seed): no shard file is this build's
    build(tmp_path / "idx2", other, OnDiskParams(nlist=20, nprobe=4, eval_queries=100, seed=1))
    assert [s.calls for s in other] == [2] * 16
