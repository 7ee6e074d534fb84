"""Safe loading: other format versions are refused, nothing is unpickled, saved state is JSON / npz / FAISS.

tests/test_index.py already covers index manifests of another format version, bad checksums and missing
files; here: checkpoints (other format, pickled code, truncated), what a run folder holds, and a grep of
the package source for unsafe loaders.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cdretrieval.config import RunConfig
from cdretrieval.errors import CheckpointError
from cdretrieval.run import CHECKPOINT_FILE, CHECKPOINT_FORMAT, load_checkpoint, load_encoder, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
PICKLE_MAGIC = re.compile(rb"^\x80[\x02-\x05]")  # pickle protocols 2..5 start with PROTO n


def _rewrite(run: Path, **changes: object) -> None:
    """Load the raw checkpoint dict, change keys, save it back with plain torch.save (as another version would)."""
    ckpt = torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, run / CHECKPOINT_FILE)


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


@pytest.mark.parametrize("fmt", [0, CHECKPOINT_FORMAT + 1, "1", None])
def test_checkpoint_of_another_format_is_refused(run: Path, fmt: object) -> None:
    _rewrite(run, format=fmt, cdretrieval="9.9.9")
    with pytest.raises(CheckpointError, match=rf"checkpoint format {re.escape(repr(fmt))} \(cdretrieval 9\.9\.9\) "
                                              rf"is not the supported format {CHECKPOINT_FORMAT}.*retrain"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="is not the supported format"):
        load_encoder(run)


def test_checkpoint_without_model_or_not_a_dict_is_refused(run: Path) -> None:
    torch.save([1, 2, 3], run / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a cdretrieval checkpoint"):
        load_checkpoint(run)
    torch.save({"format": CHECKPOINT_FORMAT}, run / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a cdretrieval checkpoint"):
        load_checkpoint(run)


def test_checkpoint_with_other_shapes_is_refused(run: Path) -> None:
    ckpt = load_checkpoint(run)
    cfg = RunConfig.from_dict(ckpt["config"])
    cfg.model.dim = 48  # the config says 48-d, the weights are 32-d
    save_checkpoint(run, {"model": ckpt["model"]}, cfg)
    with pytest.raises(CheckpointError, match="model weights do not fit the config"):
        load_encoder(run)


class _Exploit:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_checkpoint_never_runs(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    ckpt["extra"] = _Exploit(str(marker))
    torch.save(ckpt, run / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="unreadable checkpoint") as e:
        load_checkpoint(run)
    assert not marker.exists()
    # PyTorch's own message suggests retrying with weights_only=False (which would run the code): not passed on
    assert "weights_only" not in str(e.value) and "arbitrary code" not in str(e.value).lower(), str(e.value)
    assert "refused by the safe loader" in str(e.value) and "\n" not in str(e.value)


def test_truncated_or_garbage_checkpoint_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint cut short by something else (disk full, a non-atomic copy): a clear error, CLI exit 2."""
    from cdretrieval.cli import main

    data = (run / CHECKPOINT_FILE).read_bytes()
    for junk in (data[: len(data) // 2], b"", b"PK\x03\x04 not really a zip", os.urandom(4096)):
        (run / CHECKPOINT_FILE).write_bytes(junk)
        with pytest.raises(CheckpointError, match="checkpoint.pt: unreadable checkpoint"):
            load_checkpoint(run)
    assert main(["search", "--run", str(run), "--query", str(run / "config.yaml"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable checkpoint" in err and "Traceback" not in err


def _is_pickle(path: Path) -> bool:
    if path.suffix in (".pkl", ".pickle", ".joblib"):
        return True
    with open(path, "rb") as fh:
        return bool(PICKLE_MAGIC.match(fh.read(2)))


def test_run_and_index_folders_hold_no_pickles(indexed_run: Path) -> None:
    """JSON item tables and manifests, npz chunks without object arrays, FAISS's own format, a torch checkpoint."""
    files = [p for p in indexed_run.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert kinds <= {".pt", ".yaml", ".json", ".jsonl", ".faiss", ".npz"}, kinds
    for p in files:
        assert not _is_pickle(p), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            assert all(isinstance(r, dict) and {"path", "domain"} <= set(r) for r in rows)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:  # raises on any object array
                for name in z.files:
                    assert z[name].dtype != object, (p, name)
        elif p.suffix == ".pt":
            # A torch checkpoint is a zip around a pickle of tensors and plain containers: weights_only loads it.
            assert zipfile.is_zipfile(p)
            torch.load(p, map_location="cpu", weights_only=True)
    index_files = {p.name for p in (indexed_run / "index").rglob("*") if p.is_file()}
    assert index_files == {"indexset.json", "index.faiss", "items.jsonl", "manifest.json", "domain_detector.json"}


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call in ``text`` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1])
    return out


def _source_files() -> list[Path]:
    return sorted([*(REPO / "cdretrieval").rglob("*.py"), *(REPO / "app").rglob("*.py")])


def test_package_source_uses_only_safe_loaders() -> None:
    """Extra guard: every torch.load passes weights_only=True, every np.load allow_pickle=False, no pickle module."""
    assert _source_files()
    for path in _source_files():
        text = path.read_text()
        where = path.relative_to(REPO)
        for args in _calls(text, "torch.load"):
            assert "weights_only=True" in args, (where, args)
        for args in _calls(text, "np.load"):
            assert "allow_pickle=False" in args, (where, args)
        assert not re.search(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|shelve)\b", text, re.M), where
        assert not re.search(r"\b(pickle|yaml)\.(load|loads|unsafe_load)\(|yaml\.load\(", text), where
        assert not re.search(r"(?<![.\w])(eval|exec)\(", text), where  # builtins, not model.eval()


def test_torch_load_helper_refuses_pickled_code(tmp_path: Path) -> None:
    from cdretrieval.io import torch_load

    buf = io.BytesIO()
    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        torch_load(tmp_path / "evil.pt")
    assert not marker.exists()
