"""frozen_forward: ONNX Runtime equals PyTorch, its .onnx cache is checked, and every fallback lands on PyTorch."""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cdretrieval.models import runtime
from cdretrieval.models.backbones import build_backbone
from cdretrieval.models.runtime import RUNTIME_ENV, RuntimeUnavailable, frozen_forward, onnx_cache_key

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class _Tiny(nn.Module):
    """A small conv net with the backbone's shape contract: [B,3,S,S] → [B,8]; exports in well under a second."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("shift", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), persistent=False)

    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x - self.shift))), 1), 1)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own warn-once memory and the default runtime choice."""
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.delenv(RUNTIME_ENV, raising=False)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def _x(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_onnxruntime_matches_pytorch(name: str, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, "default" if name == "efficientnet_lite0" else "none").eval()
    fast = frozen_forward(model, 64, "cpu", runtime="onnxruntime", cache_root=onnx_cache)
    assert fast.runtime == "onnxruntime"
    x = _x(3, 64)
    with torch.no_grad():
        want = model(x)
    got = fast(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fast(x[:1]).shape == (1, model.feature_dim)  # dynamic batch axis
    assert (onnx_cache / f"{onnx_cache_key(model, 64)}.onnx").is_file()

    def no_export(*_: object) -> bytes:
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(runtime, "_export", no_export)
    again = frozen_forward(model, 64, "cpu", runtime="onnxruntime", cache_root=onnx_cache)
    torch.testing.assert_close(again(x), got, rtol=0, atol=0)


def test_shape_checks_and_empty_batch(tmp_path: Path) -> None:
    fast = frozen_forward(_Tiny().eval(), 32, cache_root=tmp_path)
    assert fast.runtime == "onnxruntime"
    assert fast(torch.empty(0, 3, 32, 32)).shape == (0, 8)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\]"):
        fast(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="eval mode"):
        frozen_forward(_Tiny().train(), 32, cache_root=tmp_path)
    with pytest.raises(ValueError, match="runtime must be one of"):
        frozen_forward(_Tiny().eval(), 32, runtime="tensorrt", cache_root=tmp_path)


def test_key_tracks_weights_buffers_and_size() -> None:
    a, b = _Tiny(0).eval(), _Tiny(0).eval()
    assert onnx_cache_key(a, 32) == onnx_cache_key(b, 32) != onnx_cache_key(a, 64)
    b.shift += 1  # a non-persistent buffer: not in the state dict, but in the graph
    assert onnx_cache_key(a, 32) != onnx_cache_key(b, 32)
    with torch.no_grad():
        b.shift -= 1
        b.conv.weight[0, 0, 0, 0] += 1
    assert onnx_cache_key(a, 32) != onnx_cache_key(b, 32)


def test_missing_onnxruntime_falls_back_to_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    model = _Tiny().eval()
    with pytest.warns(RuntimeWarning, match="ONNX Runtime unavailable for _Tiny: ModuleNotFoundError"):
        fast = frozen_forward(model, 32, cache_root=tmp_path)
    assert fast.runtime == "torch" and "ModuleNotFoundError" in fast.reason
    x = _x(2, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert frozen_forward(model, 32, cache_root=tmp_path).runtime == "torch"
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]  # warned once per reason
    with pytest.raises(RuntimeUnavailable, match="ModuleNotFoundError"):
        frozen_forward(model, 32, runtime="onnxruntime", cache_root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_environment_and_device_choose_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Tiny().eval()
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    fast = frozen_forward(model, 32, cache_root=tmp_path)
    assert fast.runtime == "torch" and RUNTIME_ENV in fast.reason
    x = _x(2, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    on_gpu = frozen_forward(model, 32, torch.device("cuda"), cache_root=tmp_path)  # no GPU needed: nothing runs
    assert on_gpu.runtime == "torch" and "cuda" in on_gpu.reason
    assert not list(tmp_path.iterdir())


def test_failed_export_warns_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> bytes:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtime, "_export", broken)
    with pytest.warns(RuntimeWarning, match="exporter exploded"):
        fast = frozen_forward(_Tiny().eval(), 32, cache_root=tmp_path)
    assert fast.runtime == "torch"


def test_corrupt_or_foreign_cached_file_is_reexported(tmp_path: Path) -> None:
    model = _Tiny(0).eval()
    path = tmp_path / f"{onnx_cache_key(model, 32)}.onnx"
    digest = path.with_name(path.name + ".sha256")
    frozen_forward(model, 32, cache_root=tmp_path)
    good = path.read_bytes()
    x = _x(2, 32)
    with torch.no_grad():
        want = model(x)

    path.write_bytes(good[: len(good) // 2])  # truncated: its digest no longer matches
    fast = frozen_forward(model, 32, cache_root=tmp_path)
    assert fast.runtime == "onnxruntime" and path.read_bytes() == good
    torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)

    path.write_bytes(b"\x00junk")  # garbage with a matching digest: ONNX Runtime refuses it
    digest.write_text(hashlib.sha256(b"\x00junk").hexdigest())
    assert frozen_forward(model, 32, cache_root=tmp_path).runtime == "onnxruntime" and path.read_bytes() == good

    other = tmp_path / "other"  # a valid graph of another network, digest and all: the probe catches it
    frozen_forward(_Tiny(1).eval(), 32, cache_root=other)
    foreign = next(other.glob("*.onnx")).read_bytes()
    path.write_bytes(foreign)
    digest.write_text(hashlib.sha256(foreign).hexdigest())
    fast = frozen_forward(model, 32, cache_root=tmp_path)
    assert fast.runtime == "onnxruntime" and path.read_bytes() == good
    torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)

    digest.unlink()  # a crash between the two writes: not trusted, re-exported
    assert frozen_forward(model, 32, cache_root=tmp_path).runtime == "onnxruntime" and digest.is_file()
