"""A frozen network's forward pass on the fastest runtime at hand: ONNX Runtime on CPU, PyTorch elsewhere.

Measured on the shared 2-core CPU machines (batch 32–64, 128 px, 2 threads): EfficientNet-Lite0 runs 4–7×
faster under ONNX Runtime's CPU provider than in eager PyTorch fp32 (bf16 autocast and channels_last are
slower still for it on these AVX2-only CPUs), resnet18 1.2–1.8× faster; outputs agree to ~2e-5.

:func:`frozen_forward` exports a module once (TorchScript-based ``torch.onnx.export``; dynamic batch axis,
fixed image side) into ``cache_dir()/onnx/<key>.onnx``, where the key covers the module (weights, buffers,
architecture), the input side and the versions involved, and returns a :class:`FrozenForward`: a callable
``[B, 3, S, S]`` in [0, 1] → ``[B, F]`` float32. It is PyTorch's module when

* the device is not the CPU (CUDA keeps PyTorch and the caller's AMP),
* ``$CDRETRIEVAL_RUNTIME`` (or ``runtime=``) is ``torch``,
* onnxruntime / onnx are not installed, or export, loading or the check against PyTorch fails
  (warned once per reason; ``runtime="onnxruntime"`` raises instead).

Trust: a fresh export must reproduce PyTorch's output on a probe batch (of another batch size than the
export's, so the batch axis is known to be dynamic) before it is cached; the file carries its key in the
graph's metadata and a SHA-256 beside it, and a cached file is used only when the digest, the stamped key
and ONNX Runtime all accept it. Anything else (truncated, altered, foreign, unloadable) is re-exported.

Users: the training feature cache (:func:`cdretrieval.feature_cache.build_feature_cache`) and
:class:`cdretrieval.pipeline.LoadedModel` (embedding for indexing and evaluation, and
:class:`~cdretrieval.retrieval.Retriever` queries), both with the encoder's backbone, so a frozen-mode run
and its index share one cached graph per image side (docs/runtime.md).

Why the TorchScript exporter (``dynamo=False``): it needs only ``onnx``, exports Lite0 in ~7 s and works
offline; the default dynamo exporter needs ``onnxscript`` as well, took ~30 s for Lite0 here and
logged a failed opset conversion (``Pad``) on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdretrieval.device import torch_threads
from cdretrieval.io import atomic_write_bytes, atomic_write_text
from cdretrieval.models.encoder import state_dict_hash
from cdretrieval.paths import cache_dir

#: Environment variable choosing the runtime: ``auto`` (default), ``onnxruntime`` or ``torch``.
RUNTIME_ENV = "CDRETRIEVAL_RUNTIME"
RUNTIMES = ("auto", "onnxruntime", "torch")

#: Bump when the exported graph's definition changes (names, axes, exporter settings): new cache keys.
EXPORT_FORMAT = 1
OPSET = 17
_INPUT, _OUTPUT = "images", "features"
_KEY_FIELD = "cdretrieval_key"  # graph metadata entry holding onnx_cache_key()
_EXPORT_BATCH, _PROBE_BATCH = 2, 3  # probing with another batch size checks that the batch axis is dynamic
_PROBE_RTOL, _PROBE_ATOL = 1e-3, 1e-4  # seen: ~2e-5 max abs difference (Lite0, resnet18)

_warned: set[str] = set()


class RuntimeUnavailable(RuntimeError):
    """ONNX Runtime was asked for (``runtime="onnxruntime"``) but cannot run this module."""


@dataclass(frozen=True, eq=False)
class FrozenForward:
    """A frozen network's forward pass: ``[B, 3, S, S]`` float in [0, 1] → ``[B, F]`` float32.

    ``runtime`` says what runs it (``onnxruntime`` or ``torch``) and ``reason`` why. Under ``onnxruntime``
    the result is a CPU tensor and the caller's autocast / channels_last make no difference (the graph runs
    in fp32); under ``torch`` it is exactly ``module(x)`` without gradient, on the module's device.
    """

    runtime: str
    reason: str
    image_size: int
    fn: Callable[[Tensor], Tensor]

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def frozen_forward(
    module: nn.Module,
    image_size: int,
    device: torch.device | str = "cpu",
    *,
    runtime: str | None = None,
    cache_root: Path | None = None,
) -> FrozenForward:
    """The fastest available forward pass of ``module`` (eval mode, parameters on ``device``).

    Args:
        module: a network in eval mode mapping ``[B, 3, S, S]`` to ``[B, F]``; it is not modified.
        image_size: the side ``S`` of the square inputs (the exported graph fixes it; batch is dynamic).
        device: where the caller's tensors live; anything but the CPU gets PyTorch.
        runtime: ``auto`` | ``onnxruntime`` | ``torch``; None reads ``$CDRETRIEVAL_RUNTIME`` (default ``auto``).
            ``onnxruntime`` raises :class:`RuntimeUnavailable` instead of falling back.
        cache_root: folder for the exported ``.onnx`` files (default ``cache_dir()/"onnx"``).
    """
    choice = (runtime if runtime is not None else os.environ.get(RUNTIME_ENV, "auto")).strip().lower() or "auto"
    if choice not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)} ({RUNTIME_ENV} or runtime=), got {choice!r}")
    if module.training:
        raise ValueError("frozen_forward needs a module in eval mode (call .eval() first)")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    dev = torch.device(device)
    if choice == "torch":
        return FrozenForward("torch", f"{RUNTIME_ENV}/runtime asks for torch", image_size, _torch_fn(module))
    if dev.type != "cpu":
        return FrozenForward("torch", f"device {dev} (ONNX Runtime is used on the CPU only)", image_size,
                             _torch_fn(module))
    try:
        fn = _onnx_fn(module, image_size, cache_root or cache_dir() / "onnx")
    except Exception as e:  # any failure of optional machinery means PyTorch, never a crash
        reason = f"ONNX Runtime unavailable for {type(module).__name__}: {type(e).__name__}: {e}"
        if choice == "onnxruntime":
            raise RuntimeUnavailable(reason) from e
        _warn_once(f"{reason}; running PyTorch instead (set {RUNTIME_ENV}=torch to silence)")
        return FrozenForward("torch", reason, image_size, _torch_fn(module))
    return FrozenForward("onnxruntime", "CPU device, exported graph checked against PyTorch", image_size, fn)


def onnx_cache_key(module: nn.Module, image_size: int) -> str:
    """What an exported file depends on: the module (weights, every buffer, architecture), the input side,
    the export settings and the torch / onnx / onnxruntime versions (a graph checked against PyTorch under
    one ONNX Runtime is checked again under another). 24 hex digits."""
    from importlib.metadata import version  # not ``import onnx``: that takes seconds

    buffers = hashlib.sha256()
    for name, b in sorted(module.named_buffers()):  # non-persistent ones (e.g. input mean/std) too
        t = b.detach().cpu().contiguous()
        buffers.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        buffers.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    ident = [
        EXPORT_FORMAT, OPSET, image_size, type(module).__qualname__, repr(module),
        state_dict_hash(module), buffers.hexdigest(), torch.__version__, version("onnx"), version("onnxruntime"),
    ]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------- internals


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _torch_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module(x)`` without gradient (the caller chooses device, autocast and memory format)."""

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            out: Tensor = module(x)
        return out

    return run


def _export(module: nn.Module, image_size: int, key: str) -> bytes:
    """The ONNX bytes of ``module`` for ``[batch, 3, S, S]`` inputs (TorchScript exporter, see module doc),
    with ``key`` stamped into the graph's metadata so a cached file proves what it is."""
    import tempfile

    import onnx

    example = torch.rand(_EXPORT_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="cdretrieval-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes and constant-folding remarks
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module, (example,), out, input_names=[_INPUT], output_names=[_OUTPUT], opset_version=OPSET,
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}}, do_constant_folding=True, dynamo=False,
        )
        model = onnx.load_model(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = _KEY_FIELD, key
    data: bytes = model.SerializeToString()
    return data


def _read_cached(path: Path) -> bytes | None:
    """The cached file's bytes when its recorded SHA-256 matches, else None (missing, partial, altered)."""
    digest_file = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
        recorded = digest_file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == recorded else None


def _write_cached(path: Path, data: bytes) -> None:
    """Model first, then its digest (both atomic): a crash between them leaves a file that is not trusted."""
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest() + "\n")


def _session(data: bytes) -> Any:
    """A CPU session with torch's thread count and no spin-waiting: DataLoader workers decode on the same
    cores between batches, and spinning ORT threads would take their time."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _session_fn(session: Any, image_size: int, feature_dim: int) -> Callable[[Tensor], Tensor]:
    """The callable around a session: shape check, fp32 NCHW in, ``[B, F]`` float32 CPU tensor out."""
    want = (3, image_size, image_size)

    def run(x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return torch.empty(0, feature_dim)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run([_OUTPUT], {_INPUT: arr})[0])

    return run


def _matches_torch(module: nn.Module, fn: Callable[[Tensor], Tensor], image_size: int) -> str:
    """Empty when ``fn`` reproduces ``module`` on a fixed probe batch, else what differs.

    PyTorch runs the probe on one thread: on the shared 2-core machines a 3-image Lite0 forward took ~1–2 s
    with 2 OpenMP threads (each small op waits for a descheduled thread) and ~0.05 s with one.
    """
    probe = torch.rand(_PROBE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch_threads(1):
        want = module(probe).float()
    got = fn(probe)
    if got.shape != want.shape:
        return f"output shape {list(got.shape)} != PyTorch's {list(want.shape)}"
    if not torch.allclose(got, want, rtol=_PROBE_RTOL, atol=_PROBE_ATOL):
        return f"output differs from PyTorch's by up to {float((got - want).abs().max()):.3g}"
    return ""


def _load(data: bytes, key: str, image_size: int) -> Callable[[Tensor], Tensor]:
    """A checked session callable for ``data``: ONNX Runtime loads it, it carries ``key``, its output is
    ``[batch, F]``. Raises ``ValueError`` (or ONNX Runtime's error) otherwise."""
    session = _session(data)
    stamped = session.get_modelmeta().custom_metadata_map.get(_KEY_FIELD)
    if stamped != key:
        raise ValueError(f"graph is stamped {stamped!r}, not {key!r}")
    feature_dim = session.get_outputs()[0].shape[-1]
    if len(session.get_outputs()[0].shape) != 2 or not isinstance(feature_dim, int):
        raise ValueError(f"graph output {session.get_outputs()[0].shape} is not [batch, F]")
    return _session_fn(session, image_size, feature_dim)


def _onnx_fn(module: nn.Module, image_size: int, root: Path) -> Callable[[Tensor], Tensor]:
    """Load ``module``'s cached graph, or export, check against PyTorch, cache and load it; raises on failure.

    A cached file is used only when its digest, its stamped key and ONNX Runtime all accept it (it passed the
    PyTorch check when it was exported: the key covers weights, architecture and every version involved).
    """
    import onnxruntime  # noqa: F401  (fail early, before a costly export, when it is missing)

    if any(p.device.type != "cpu" for p in module.parameters()):
        raise RuntimeError("module parameters are not on the CPU")
    key = onnx_cache_key(module, image_size)
    path = root / f"{key}.onnx"
    cached = _read_cached(path)
    if cached is not None:
        try:
            return _load(cached, key, image_size)
        except Exception:  # corrupt, foreign or unloadable: re-exported below, never trusted
            pass
    data = _export(module, image_size, key)
    fn = _load(data, key, image_size)
    problem = _matches_torch(module, fn, image_size)
    if problem:
        raise RuntimeError(f"exported graph does not reproduce the module: {problem}")
    _write_cached(path, data)
    return fn
