"""Crash safety for real: ``kill -9`` of training, embedding and indexing subprocesses at several moments.

After every kill the previous good state must be loadable (or absent, or refused with a clear error —
never half-read), and rerunning must finish with the result of an uninterrupted run: the same model
after ``pretrain --resume``, bit-identical embeddings after a resumed embedding, the same index after
rebuilding it.

Moments: as soon as a temporary file of an atomic write appears (a checkpoint / chunk / index file being
written), right after the first complete checkpoint / chunk / manifest, and after a random short delay
(the seed is printed in assertion messages).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_setup import small_config

from cdretrieval.config import RunConfig
from cdretrieval.errors import IndexFileError
from cdretrieval.index import INDEX_SET_FILE, MANIFEST_FILE, IndexSet
from cdretrieval.run import CHECKPOINT_FILE, load_checkpoint, load_encoder, model_hash

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("CDRETRIEVAL_KILL_SEED", random.SystemRandom().randrange(10**6)))


def _env(one_thread: bool = True) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    if one_thread:  # faster on the shared 2-core machines
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    else:  # the default thread count, as a user runs it (issue 14: resume must be exact there too)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(name, None)
    return env


def _spawn(args: list[str], log: Path, one_thread: bool = True) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")  # noqa: SIM115 (closed by the child's exit; the parent keeps no handle it reads)
    return subprocess.Popen([sys.executable, *args], env=_env(one_thread), cwd=REPO, stdout=fh,
                            stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 120.0) -> bool:
    """Poll ``condition`` (every ~2 ms) and ``kill -9`` the process when it holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    raise AssertionError(f"condition not met within {timeout} s")


def _after(seconds: float) -> Callable[[], bool]:
    start = time.monotonic()
    return lambda: time.monotonic() - start >= seconds


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300.0) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-3000:]


def _tmp_files(folder: Path, name: str) -> list[Path]:
    """Temporary files of an atomic write of ``folder/name`` (``.<name>.<random>.tmp``)."""
    return list(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------------------
# pretrain


def _train_config(path: Path) -> Path:
    small_config(None, hidden_dim=64, epochs=6, steps_per_epoch=20).save(path)
    return path


def _check_previous_state(run: Path, why: str) -> int:
    """The run folder after a kill: no checkpoint yet, or one that loads completely. Returns its epoch."""
    ckpt_path = run / CHECKPOINT_FILE
    if not ckpt_path.exists():
        return 0
    ckpt = load_checkpoint(run)  # a half-written checkpoint would raise CheckpointError here
    assert {"model", "optimizer", "scheduler", "banks", "rng", "config"} <= set(ckpt), why
    RunConfig.load(run / "config.yaml")  # the config beside it is complete too
    load_encoder(run)
    return int(ckpt["epoch"])


def test_kill_pretrain_then_resume_matches_uninterrupted(demo_root: Path, tmp_path: Path) -> None:
    cfg = _train_config(tmp_path / "cfg.yaml")
    rng = random.Random(SEED)
    run, log = tmp_path / "run", tmp_path / "run.log"
    base = ["-m", "cdretrieval.cli", "pretrain", "--data", str(demo_root), "--config", str(cfg), "--no-progress"]

    # 1. a random short delay: before, during or after the one-off feature caching
    delay = rng.uniform(2.0, 12.0)
    why = f"seed {SEED}: killed after {delay:.2f} s"
    killed = _kill_when(_spawn([*base, "--out", str(run)], log, one_thread=False), _after(delay))
    print(f"pretrain {why}: killed={killed}, checkpoint epoch {_check_previous_state(run, why)}, "
          f"temporary files left {len(_tmp_files(run, CHECKPOINT_FILE))}")
    # 2. while the first checkpoint (~15 MB) is being written: the temporary file exists, checkpoint.pt not yet
    stale = set(_tmp_files(run, CHECKPOINT_FILE))  # left by kill 1 if it hit a save; never read
    proc = _spawn([*base, "--out", str(run), "--resume"], log, one_thread=False)
    before = _check_previous_state(run, why)
    killed = _kill_when(proc, lambda: bool(set(_tmp_files(run, CHECKPOINT_FILE)) - stale))
    epoch_mid = _check_previous_state(run, "killed while a checkpoint was written")
    print(f"pretrain killed while writing a checkpoint: killed={killed}, checkpoint epoch {epoch_mid}, "
          f"temporary files left {len(_tmp_files(run, CHECKPOINT_FILE))}")
    assert not killed or epoch_mid >= before
    # 3. right after a new checkpoint appears
    proc = _spawn([*base, "--out", str(run), "--resume"], log, one_thread=False)
    seen = (run / CHECKPOINT_FILE).stat().st_mtime_ns if (run / CHECKPOINT_FILE).exists() else None

    def new_checkpoint() -> bool:
        try:
            return (run / CHECKPOINT_FILE).stat().st_mtime_ns != seen
        except FileNotFoundError:
            return False

    killed = _kill_when(proc, new_checkpoint)
    epoch_after = _check_previous_state(run, "killed right after a checkpoint")
    assert not killed or epoch_after >= max(1, epoch_mid)
    print(f"pretrain killed right after a new checkpoint: killed={killed}, checkpoint epoch {epoch_after}")
    # 4. resume to the end
    _finish(_spawn([*base, "--out", str(run), "--resume"], log, one_thread=False), log)

    reference = tmp_path / "reference"
    ref_log = tmp_path / "reference.log"
    _finish(_spawn([*base, "--out", str(reference)], ref_log, one_thread=False), ref_log)
    got, want = load_checkpoint(run), load_checkpoint(reference)
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (6, 120)
    for k in want["model"]:
        # exactly equal at the default thread count (bank updates are order-independent: cdretrieval/memory.py)
        assert torch.equal(got["model"][k], want["model"][k]), f"{k}; {why}"
    assert got["last_losses"] == want["last_losses"]
    assert json.loads((run / "train_summary.json").read_text())["epochs"] == 6


# ---------------------------------------------------------------------------------------------------------
# embed


_EMBED = """
import sys, torch
torch.set_num_threads(1)
from cdretrieval.domain_embeddings import embed_domains
embed_domains(sys.argv[1], sys.argv[2], embeddings_dir=sys.argv[3], chunk_size=16, batch_size=16, num_workers=0,
              device="cpu", progress=False)
"""


def _check_chunks(folder: Path, why: str) -> int:
    """Every chunk that progress.json counts is a complete, readable chunk. Returns the chunks counted."""
    counted = 0
    for progress_file in folder.rglob("progress.json"):
        progress = json.loads(progress_file.read_text())  # complete JSON, never half-written
        done, n = int(progress["chunks_done"]), int(progress["key"]["n_samples"])
        for i in range(done):
            with np.load(progress_file.parent / f"chunk_{i:06d}.npz", allow_pickle=False) as z:
                rows, bad = len(z["indices"]), len(z["bad_indices"])
                assert z["embeddings"].shape == (rows, 32), why
                assert rows + bad == min(16, n - 16 * i), why
                assert np.isfinite(z["embeddings"]).all(), why
        counted += done
    return counted


def test_kill_embedding_then_resume_gives_identical_embeddings(
    tiny_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    store, log = tmp_path / "emb", tmp_path / "emb.log"
    args = ["-c", _EMBED, str(tiny_run), str(demo_root), str(store)]

    # 1. the first chunk is complete (progress.json counts it)
    assert _kill_when(_spawn(args, log), lambda: any(store.rglob("progress.json")))
    first = _check_chunks(store, "after the first chunk")
    print(f"embed killed after the first chunk: {first} chunk(s) counted")
    assert first >= 1
    # 2. while a chunk file is being written, or else as soon as three more chunks are counted
    stale = set(store.rglob(".*.tmp"))

    def writing_chunk() -> bool:
        if set(store.rglob(".chunk_*.tmp")) - stale:
            return True
        try:
            return _check_chunks(store, "") >= first + 3
        except (OSError, ValueError, KeyError):  # progress.json replaced between listing and reading
            return False

    killed = _kill_when(_spawn(args, log), writing_chunk)
    second = _check_chunks(store, "killed while writing a chunk")
    print(f"embed killed while writing: killed={killed}, {second} chunks counted, "
          f"{len(list(store.rglob('.*.tmp')))} temporary files left")
    # 3. a random short delay (start-up alone takes ~5 s here)
    delay = rng.uniform(5.0, 10.0)
    killed = _kill_when(_spawn(args, log), _after(delay))
    third = _check_chunks(store, f"seed {SEED}: killed after {delay:.2f} s")
    print(f"embed seed {SEED}, killed after {delay:.2f} s: killed={killed}, {third} chunks counted")
    assert first <= second <= third
    # 4. resume to the end, and an uninterrupted reference in its own folder
    _finish(_spawn(args, log), log)
    reference = tmp_path / "reference"
    _finish(_spawn(["-c", _EMBED, str(tiny_run), str(demo_root), str(reference)], log), log)
    assert _check_chunks(store, "final") == _check_chunks(reference, "reference") == 3 * 8

    from cdretrieval.domain_embeddings import embed_domains

    got = embed_domains(tiny_run, demo_root, embeddings_dir=store, chunk_size=16, batch_size=16, num_workers=0,
                        device="cpu", progress=False)
    want = embed_domains(tiny_run, demo_root, embeddings_dir=reference, chunk_size=16, batch_size=16,
                         num_workers=0, device="cpu", progress=False)
    for d in want:
        assert got[d].items == want[d].items
        np.testing.assert_array_equal(got[d].embeddings, want[d].embeddings, err_msg=f"{d}; seed {SEED}")


# ---------------------------------------------------------------------------------------------------------
# index


def _check_index(run: Path, expected_hash: str, why: str) -> IndexSet | None:
    """After a kill: the index set loads completely (checksums verified), or is refused with a clear error."""
    try:
        return IndexSet.load(run / "index", expected_model_hash=expected_hash, use_gpu=False)
    except IndexFileError as e:
        assert "cdretrieval index" in str(e), (why, str(e))
        from cdretrieval.retrieval import Retriever

        with pytest.raises(IndexFileError, match="cdretrieval index"):
            Retriever.from_run(run, device="cpu")
        return None


def _same_index(got: IndexSet, want: IndexSet, why: str) -> None:
    assert got.domains == want.domains, why
    for d in want:
        assert got[d].items == want[d].items, (d, why)
        n = len(want[d])
        np.testing.assert_allclose(got[d].index.reconstruct_n(0, n), want[d].index.reconstruct_n(0, n), atol=1e-5)


def test_kill_indexing_then_rebuild_matches(indexed_run: Path, demo_root: Path, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "index.log"
    shutil.copytree(indexed_run, run)
    enc, _ = load_encoder(run)
    expected_hash = model_hash(enc)
    want = IndexSet.load(indexed_run / "index", expected_model_hash=expected_hash, use_gpu=False)
    args = ["-m", "cdretrieval.cli", "index", "--run", str(run), "--data", str(demo_root), "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--no-rerank"]  # indexed_run is plain (tests/conftest.py)
    rng = random.Random(SEED + 2)
    outcomes = []

    def fresh_photo_embeddings() -> None:  # photo is re-embedded (~2 s): the run lasts long enough to interrupt
        shutil.rmtree(run / "embeddings" / "photo", ignore_errors=True)

    # 1. as soon as the save starts (the new index folder is being written beside the old one) or a
    #    manifest is being written, and at the swap (the old folder moved aside, the new not yet in place)
    fresh_photo_embeddings()
    killed = _kill_when(_spawn(args, log), lambda: not (run / "index" / INDEX_SET_FILE).exists()
                        or any(run.glob(".index.tmp-*")) or any(run.glob(f".index.tmp-*/*/.{MANIFEST_FILE}.*.tmp")))
    outcomes.append(("save started", killed, _check_index(run, expected_hash, "save started")))
    fresh_photo_embeddings()
    killed = _kill_when(_spawn(args, log), lambda: any(run.glob(f".index.tmp-*/{INDEX_SET_FILE}"))
                        or any(run.glob(".index.old-*")))
    outcomes.append(("manifest replaced", killed, _check_index(run, expected_hash, "manifest replaced")))
    # 2. right after the first domain's manifest is written again
    fresh_photo_embeddings()
    marks = {p: p.stat().st_mtime_ns for p in (run / "index").glob(f"*/{MANIFEST_FILE}")}

    def manifest_rewritten() -> bool:
        for p in (run / "index").glob(f"*/{MANIFEST_FILE}"):
            try:
                if p.stat().st_mtime_ns != marks.get(p):
                    return True
            except FileNotFoundError:
                pass
        return False

    killed = _kill_when(_spawn(args, log), manifest_rewritten)
    outcomes.append(("first manifest", killed, _check_index(run, expected_hash, "first manifest")))
    # 3. random short delays
    for _ in range(2):
        fresh_photo_embeddings()
        delay = rng.uniform(3.0, 9.0)
        why = f"seed {SEED}: killed after {delay:.2f} s"
        killed = _kill_when(_spawn(args, log), _after(delay))
        outcomes.append((why, killed, _check_index(run, expected_hash, why)))
    for why, killed, iset in outcomes:
        print(f"index {why}: killed={killed}, index afterwards: {'loads' if iset else 'refused (IndexFileError)'}")
        assert iset is not None, f"{why}: the old index was lost (saves must swap in a complete new folder)"
        _same_index(iset, want, why)  # whatever loaded after a kill is a whole, correct index (old or new)
    # 4. rebuild to the end
    _finish(_spawn(args, log), log)
    final = _check_index(run, expected_hash, "final")
    assert final is not None
    _same_index(final, want, "rebuilt")
