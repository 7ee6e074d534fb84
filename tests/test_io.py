from pathlib import Path

import pytest
import torch

from cdretrieval.io import atomic_open, atomic_torch_save, atomic_write_json, read_json, torch_load


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "m.json"
    atomic_write_json(p, {"a": 1})
    assert read_json(p) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_open(p, "w") as fh:
        fh.write('{"a": 2')
        raise RuntimeError("crash mid-write")
    assert read_json(p) == {"a": 1}
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]  # no temp file left


def test_torch_roundtrip_weights_only(tmp_path: Path) -> None:
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch_load(tmp_path / "c.pt")["w"], torch.arange(3))


def test_read_json_error_names_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ValueError, match="x.json"):
        read_json(tmp_path / "x.json")
