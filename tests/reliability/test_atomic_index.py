"""Index saves are atomic: a crash at any step of rewriting an index leaves the old index whole and searchable.

A crash is simulated in-process: every file-system step of a save (mkdir, open, fsync, rename, replace,
unlink, rmtree) is counted, and at step ``i`` it raises and so does every later step (a killed process does
nothing more, not even its clean-up handlers). Each ``i`` up to the number of steps of a whole save is tried.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdretrieval.index import DomainIndex, IndexSet, Item

DIM = 16
_STEPS = ("mkdir", "open", "fsync", "rename", "replace", "unlink", "rmdir")


class Crash(BaseException):
    """The simulated ``kill -9`` (a BaseException, like KeyboardInterrupt: nothing catches it by mistake)."""


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _items(n: int, domain: str, tag: str) -> list[Item]:
    return [Item(f"/data/{domain}/{tag}{i}.png", domain) for i in range(n)]


def _index_set(seed: int, tag: str) -> IndexSet:
    domains = ("photo", "sketch")
    return IndexSet.build({d: _vectors(30, seed + j) for j, d in enumerate(domains)},
                          {d: _items(30, d, tag) for d in domains}, "hash-a")


@contextmanager
def _crash_at(step: int | None) -> Iterator[list[str]]:
    """Count file-system steps; from step ``step`` on (None: never) each one raises :class:`Crash`."""
    calls: list[str] = []
    originals: dict[str, Callable[..., Any]] = {name: getattr(os, name) for name in _STEPS}
    original_rmtree = shutil.rmtree

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if step is not None and len(calls) > step:
                raise Crash(f"killed at step {step} ({name})")
            return fn(*args, **kwargs)
        return wrapped

    def rmtree(*args: Any, **kwargs: Any) -> None:
        calls.append("rmtree")
        if step is not None and len(calls) > step:
            raise Crash(f"killed at step {step} (rmtree)")
        original_rmtree(*args, **kwargs)

    for name, fn in originals.items():
        setattr(os, name, wrap(name, fn))
    shutil.rmtree = rmtree  # type: ignore[assignment]
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)
        shutil.rmtree = original_rmtree  # type: ignore[assignment]


def _answers(iset: IndexSet, queries: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for d in iset:
        _, ids = iset[d].search(queries, 5)
        out[d] = ([iset[d].items[i].path for i in ids[0]], ids)
    return out


def _same(got: dict[str, tuple[list[str], np.ndarray]], want: dict[str, tuple[list[str], np.ndarray]]) -> bool:
    return got.keys() == want.keys() and all(got[d][0] == want[d][0] for d in want)


def test_crash_at_every_step_of_an_index_set_save_keeps_old_or_new(tmp_path: Path) -> None:
    root = tmp_path / "run" / "index"
    old, new = _index_set(0, "old"), _index_set(100, "new")
    old.save(root)
    queries = _vectors(1, 7)
    want_old, want_new = _answers(old, queries), _answers(new, queries)
    old.save(tmp_path / "probe")
    with _crash_at(None) as calls:  # how many steps a whole save over an existing index takes
        new.save(tmp_path / "probe")
    n_steps = len(calls)
    assert n_steps > 10
    outcomes = {"old": 0, "new": 0}
    for i in range(n_steps):
        old.save(root)  # back to the old index (and clean-up of the previous crash's debris)
        with _crash_at(i), pytest.raises(Crash):
            new.save(root)
        loaded = IndexSet.load(root, expected_model_hash="hash-a", use_gpu=False)  # recovers
        got = _answers(loaded, queries)
        assert _same(got, want_old) or _same(got, want_new), f"crash at step {i}: neither old nor new index"
        outcomes["old" if _same(got, want_old) else "new"] += 1
        leftovers = sorted(p.name for p in root.parent.iterdir() if p.name != "index")
        assert leftovers == [], f"crash at step {i}: load left {leftovers}"
    # before the new folder is renamed into place the old index answers, after it the new one
    swap = len(calls) - calls[::-1].index("rename")
    assert outcomes == {"old": swap, "new": n_steps - swap}, (outcomes, swap)
    new.save(root)
    assert _same(_answers(IndexSet.load(root, use_gpu=False), queries), want_new)


def test_crash_at_every_step_of_a_domain_save_keeps_old_or_new(tmp_path: Path) -> None:
    folder = tmp_path / "index" / "photo"
    old = DomainIndex.build(_vectors(30, 0), _items(30, "photo", "old"), "photo", "hash-a")
    new = DomainIndex.build(_vectors(40, 1), _items(40, "photo", "new"), "photo", "hash-a")
    queries = _vectors(2, 9)
    want_old = old.search(queries, 4)[1].tolist()
    want_new = new.search(queries, 4)[1].tolist()
    old.save(tmp_path / "probe" / "photo")
    with _crash_at(None) as calls:
        new.save(tmp_path / "probe" / "photo")
    assert "rename" in calls
    for i in range(len(calls)):
        old.save(folder)
        with _crash_at(i), pytest.raises(Crash):
            new.save(folder)
        loaded = DomainIndex.load(folder, use_gpu=False)
        assert len(loaded) in (30, 40), f"crash at step {i}"
        assert loaded.search(queries, 4)[1].tolist() == (want_old if len(loaded) == 30 else want_new)
        assert sorted(p.name for p in folder.parent.iterdir()) == ["photo"], f"crash at step {i}"


def test_save_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not part of an index set"):
        _index_set(0, "x").save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
