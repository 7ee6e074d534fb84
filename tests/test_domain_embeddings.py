"""Embedding under ``torchrun``: 2 gloo processes share each domain's chunks and give exactly the result of 1;
a rank killed with ``kill -9`` mid-way leaves finished chunks that the rerun keeps; ``cdretrieval index
--index-type ivf-ondisk`` under torchrun (embedding, then shards read from the chunk store) gives the index of
1 process, which equals one built from the same vectors in memory (issue 15)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cdretrieval.embedding_chunks import PROGRESS_FILE

REPO = Path(__file__).resolve().parents[1]
DOMAINS = "ink,photo"  # two of the demo's three domains: 2 × 120 images, 8 chunks of 16 each
CHUNK = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_cmd(command: str, run: Path, data: Path, nproc: int, *more: str) -> list[str]:
    """``cdretrieval COMMAND`` in one process, or under torchrun with ``nproc`` gloo processes (``-m -- MODULE``:
    torchrun would otherwise take ``--run`` for an abbreviation of its own ``--run-path``)."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m",
                "--"]
    args = ["cdretrieval.cli", command, "--run", str(run), "--data", str(data), "--domains", DOMAINS,
            "--chunk-size", str(CHUNK), "--batch-size", str(CHUNK), "--num-workers", "0", "--device", "cpu",
            "--no-progress", *more]
    return [sys.executable, *(launcher if nproc > 1 else ["-m"]), *args]


def _embed_cmd(run: Path, data: Path, nproc: int) -> list[str]:
    return _cli_cmd("embed", run, data, nproc)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _chunk_files(run: Path) -> dict[Path, os.stat_result]:
    return {p.relative_to(run): p.stat() for p in sorted((run / "embeddings").rglob("chunk_*.npz"))}


def _same_store(got: Path, want: Path) -> None:
    """Both runs' stores hold the same complete progress and bit-identical chunk arrays."""
    files = _chunk_files(want)
    assert list(_chunk_files(got)) == list(files) and len(files) == 16
    for rel in files:
        with np.load(got / rel) as a, np.load(want / rel) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in b.files:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{rel}:{name}")
    for progress in (want / "embeddings").rglob(PROGRESS_FILE):
        a, b = (json.loads((r / progress.relative_to(want)).read_text()) for r in (got, want))
        assert a["key"] == b["key"] and a["chunks_done"] == b["chunks_done"] == 8 and a["complete"]


@pytest.fixture(scope="module")
def reference(tiny_run: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_run`` embedded by one process (the result the distributed runs must reproduce)."""
    run = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(tiny_run, run)
    _run(_embed_cmd(run, demo_root, 1))
    return run


def test_two_gloo_processes_give_the_result_of_one(
    reference: Path, tiny_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = _run(_embed_cmd(run, demo_root, 2))
    _same_store(run, reference)
    summary = json.loads(out.stdout[out.stdout.index("{"):])  # rank 0 alone prints the summary
    assert {d: s["embedded"] for d, s in summary["domains"].items()} == {"ink": 120, "photo": 120}

    from cdretrieval.domain_embeddings import embed_domains

    kwargs = {"domains": DOMAINS, "chunk_size": CHUNK, "device": "cpu", "progress": False, "num_workers": 0}
    got, want = embed_domains(run, demo_root, **kwargs), embed_domains(reference, demo_root, **kwargs)
    for d in want:  # the item tables (path, domain, label, size) and rows, read back from the stores
        assert got[d].items == want[d].items and len(want[d]) == 120
        np.testing.assert_array_equal(got[d].embeddings, want[d].embeddings)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` under ``launcher``, when it has started."""
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"cdretrieval.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the worker")
def test_killed_rank_rerun_redoes_only_unfinished_chunks(
    reference: Path, tiny_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first = run / "embeddings" / "ink" / "head" / "chunk_000001.npz"  # rank 1's first chunk
    proc = subprocess.Popen(_embed_cmd(run, demo_root, 2), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not first.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 wrote no chunk"
            time.sleep(0.002)
        # Freeze both ranks at once, so no chunk is written while rank 1 is looked up (a loaded machine could
        # otherwise let them finish the domain before the kill); then kill rank 1 and let rank 0 go on.
        workers = _descendants(proc.pid)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        for pid in workers:
            if pid != victim:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _chunk_files(run)
    assert 1 <= len(before) < 16, f"{len(before)} chunks written before the kill"

    _run(_embed_cmd(run, demo_root, 2))
    after = _chunk_files(run)
    kept = [rel for rel, st in before.items() if (after[rel].st_ino, after[rel].st_mtime_ns) == (st.st_ino,
                                                                                              st.st_mtime_ns)]
    assert kept == list(before), "a chunk finished before the kill was computed again"
    _same_store(run, reference)


def test_two_gloo_processes_build_the_ondisk_index_of_one(tiny_run: Path, demo_root: Path, tmp_path: Path) -> None:
    from cdretrieval.domain_embeddings import embed_domains
    from cdretrieval.index import ONDISK_TYPE, DomainIndex, IndexSet

    sets = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        shutil.copytree(tiny_run, run)
        out = _run(_cli_cmd("index", run, demo_root, nproc, "--index-type", ONDISK_TYPE, "--no-rerank",
                            "--shard-rows", "32"))  # 2 chunks a shard: 4 shards a domain, 2 per rank
        summary = json.loads(out.stdout[out.stdout.index("{"):])  # rank 0 alone prints the summary
        assert summary["domains"] == {d: {"count": 120, "index_type": ONDISK_TYPE} for d in ("ink", "photo")}
        sets[nproc] = IndexSet.load(run / "index", use_gpu=False)
        assert not list(run.glob(".*.ondisk-shards")), "shard files left after the merge"
    one, two = sets[1], sets[2]
    queries = np.random.default_rng(0).standard_normal((20, one.dim)).astype(np.float32)
    kwargs = {"domains": DOMAINS, "chunk_size": CHUNK, "device": "cpu", "progress": False, "num_workers": 0}
    embedded = embed_domains(tmp_path / "run1", demo_root, **kwargs)  # the same vectors, read back into memory
    for d, e in embedded.items():
        assert one[d].manifest["ondisk"]["shards"] == two[d].manifest["ondisk"]["shards"] == [32, 32, 32, 24]
        assert two[d].items == one[d].items == e.items
        memory = DomainIndex.build(e.embeddings, e.items, d, one.model_hash, ONDISK_TYPE, shard_rows=32,
                                   ondisk_dir=tmp_path / "memory", use_gpu=False)
        want_scores, want_ids = memory.search(queries, 10)
        for got in (one[d], two[d]):
            scores, ids = got.search(queries, 10)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert one.detector is not None and two.detector is not None
    assert two.detector.summary() == one.detector.summary()
