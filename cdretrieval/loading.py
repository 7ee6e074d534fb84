"""Loading a run for use: its encoder ready to embed (:class:`LoadedModel`) and its saved indexes.

Serving (:class:`~cdretrieval.retrieval.Retriever`, the UI, the API) and the batch jobs (embedding, indexing,
evaluation) both start here, so this module depends on neither: it imports the model, the run folder and
the index files, never the embedding-chunk store, the metrics or the training code.

* :func:`load_model` — a run's encoder, or the no-adaptation baseline backbone, as a :class:`LoadedModel`.
* :func:`load_run_index` — a run's encoder and its :class:`~cdretrieval.index.IndexSet`, checked to belong
  together (same model hash, feature, dimension and image size).

On the CPU the backbone runs under ONNX Runtime (:meth:`LoadedModel.backbone_forward`; 3–4× the eager
PyTorch embedding pass for Lite0 at 128 px, see docs/runtime.md); ``$CDRETRIEVAL_RUNTIME=torch`` keeps
PyTorch, CUDA always does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cdretrieval.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, RunConfig
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import amp_dtype, resolve_device, use_channels_last
from cdretrieval.errors import CheckpointError, DataError, IndexMismatchError
from cdretrieval.index import INDEX_SET_FILE, MANIFEST_FILE, IndexSet, UseGpu, safe_domain_name
from cdretrieval.io import read_json
from cdretrieval.models.backbones import DEFAULT_BACKBONE
from cdretrieval.models.encoder import Encoder, build_encoder, state_dict_hash
from cdretrieval.models.runtime import RUNTIMES, FrozenForward, frozen_forward
from cdretrieval.run import CHECKPOINT_FILE, INDEX_DIR, load_encoder, model_hash

logger = logging.getLogger(__name__)

#: The embeddings a :class:`LoadedModel` computes: the projection head's output, or the backbone's pooled
#: features (both L2-normalised).
FEATURES = ("head", "backbone")

# ---------------------------------------------------------------------------------------------------------
# The model that embeds


class _BackboneForwards:
    """The :class:`FrozenForward` of one encoder's backbone per (image side, runtime choice): each built once,
    on first use, under a lock (concurrent callers wait for the one build). Shared by the copies
    :meth:`LoadedModel.with_feature` makes, since every feature comes from the same backbone pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[tuple[int, str | None], FrozenForward] = {}

    def get(
        self, backbone: torch.nn.Module, image_size: int, device: torch.device, runtime: str | None
    ) -> FrozenForward:
        with self._lock:
            fwd = self._built.get((image_size, runtime))
            if fwd is None:
                fwd = frozen_forward(backbone, image_size, device, runtime=runtime)
                self._built[(image_size, runtime)] = fwd
                logger.info("%s backbone at %d px runs on %s (%s)", type(backbone).__name__, image_size,
                            fwd.runtime, fwd.reason)
            return fwd


@dataclass
class LoadedModel:
    """An encoder ready to embed, and what its embeddings depend on.

    The backbone's forward pass runs through :func:`~cdretrieval.models.runtime.frozen_forward`: on the CPU an
    ONNX Runtime graph of the backbone (exported once per weights and image side, cached, checked against
    PyTorch), else PyTorch. The exported graph is the backbone alone (``[B, 3, S, S]`` → pooled ``[B, F]``);
    the L2 normalisation (``backbone`` feature) and the small projection head (``head`` feature) run in
    PyTorch fp32 on its output, so one graph serves both features, both at once (the Retriever's
    ``extra`` feature) and the training feature cache (which exports the same backbone: same cache key).
    """

    encoder: Encoder  # eval mode, on ``device``
    backbone: str
    feature: str  # "head" | "backbone": which output is the embedding
    image_size: int  # eval transform side in pixels
    model_hash: str  # run: model_hash(encoder), what index manifests record; baseline: "<backbone>:<hash>"
    cache_key_hash: str  # what cached embeddings depend on (the baseline's random head is left out)
    run_dir: Path | None  # absolute; None for the baseline
    device: torch.device
    amp: torch.dtype | None  # autocast dtype of the PyTorch path (ONNX Runtime runs fp32)
    channels_last: bool  # input layout of the PyTorch path
    config: RunConfig | None = None
    #: ``auto`` | ``onnxruntime`` | ``torch`` for the backbone's forward; None reads ``$CDRETRIEVAL_RUNTIME``.
    runtime: str | None = None
    _forwards: _BackboneForwards = field(default_factory=_BackboneForwards, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Embedding dimension for ``feature``."""
        return self.encoder.output_dim(self.feature)

    def backbone_forward(self) -> FrozenForward:
        """The backbone's forward pass at ``image_size``, built on first use: under ONNX Runtime an export the
        first time these weights and side are seen (2.5 s for Lite0 at 128 px here), afterwards loading the
        cached graph (0.1 s for Lite0, 1 s for resnet18)."""
        return self._forwards.get(self.encoder.backbone, self.image_size, self.device, self.runtime)

    def input_settings(self) -> tuple[torch.dtype | None, bool]:
        """``(autocast dtype, channels_last)`` for the inputs of :meth:`embed`: the model's under PyTorch,
        ``(None, False)`` under ONNX Runtime (its graph is fp32 NCHW; anything else is only converted back)."""
        if self.backbone_forward().runtime == "onnxruntime":
            return None, False
        return self.amp, self.channels_last

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] → L2-normalised ``[B, dim]`` (``Encoder.embed`` through the backbone runtime)."""
        return self.embed_features(x, (self.feature,))[0]

    def embed_features(self, x: torch.Tensor, features: Sequence[str]) -> list[torch.Tensor]:
        """Several features of ``x`` from one backbone pass: one L2-normalised ``[B, dim(feature)]`` each.

        Without gradient. Under PyTorch this is exactly ``Encoder.embed`` (in the caller's autocast); under
        ONNX Runtime the backbone's graph runs fp32 and the normalisation / head run in fp32, autocast off.
        """
        for feature in features:
            check_feature(feature)
        fwd = self.backbone_forward()
        onnx = fwd.runtime == "onnxruntime"
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False) if onnx else contextlib.nullcontext():
            f = fwd(x)  # [B, F]
            out = {}
            if "backbone" in features:
                out["backbone"] = F.normalize(f.float(), dim=1)
            if "head" in features:
                out["head"] = self.encoder.project(f)
        return [out[feature] for feature in features]

    def with_feature(self, feature: str) -> LoadedModel:
        """The same model embedding with another ``feature`` (sharing the built backbone forward)."""
        check_feature(feature)
        if feature == "head" and self.run_dir is None:
            raise CheckpointError("feature 'head' needs a trained run folder; the baseline has only 'backbone'")
        other = dataclasses.replace(self, feature=feature)
        other._forwards = self._forwards
        return other


def check_image_size(size: Any, what: str) -> int:
    """``size`` as an image side in pixels: a multiple of 32 in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE].

    Raises:
        DataError: anything else, naming ``what`` (e.g. the manifest it was read from).
    """
    ok = isinstance(size, int) and not isinstance(size, bool)
    if not ok or size % 32 or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{what} must be a multiple of 32 in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")
    return int(size)


def check_feature(feature: str) -> None:
    """Raise ``ValueError`` unless ``feature`` is one of :data:`FEATURES`."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


def load_model(
    run_dir: str | os.PathLike[str] | None,
    *,
    backbone: str | None = None,
    weights: str = "default",
    feature: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    runtime: str | None = None,
) -> LoadedModel:
    """The encoder of a run (``run_dir``), or the no-adaptation baseline ``backbone`` (``run_dir=None``).

    Args:
        run_dir: run folder written by ``cdretrieval pretrain``; None for the baseline.
        backbone: baseline backbone (default EfficientNet-Lite0); with a run it must match the run's.
        weights: baseline backbone weights (``default``, ``none``, or a state-dict file); ignored with a run.
        feature: ``head`` | ``backbone`` (default: the run's ``model.index_feature``; ``backbone`` without run).
        image_size: eval image side (default: the run's ``data.image_size``; 160 without a run).
        device: ``auto`` | ``cpu`` | ``cuda[:i]`` | a torch.device.
        runtime: the backbone's runtime, ``auto`` | ``onnxruntime`` | ``torch`` (None: ``$CDRETRIEVAL_RUNTIME``,
            default ``auto``: ONNX Runtime on the CPU when it works); see :meth:`LoadedModel.backbone_forward`.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES} or None, got {runtime!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cfg: RunConfig | None = None
    run: Path | None = None
    if run_dir is not None:
        run = Path(run_dir).expanduser().resolve()
        encoder, cfg = load_encoder(run, device=dev)
        if backbone is not None and backbone != cfg.model.backbone:
            raise CheckpointError(f"backbone {backbone!r} given, but the run {run} uses {cfg.model.backbone!r}")
        name = cfg.model.backbone
        feature = feature or cfg.model.index_feature
        size = image_size or cfg.data.image_size
        precision = cfg.train.precision
        full_hash = model_hash(encoder)
        cache_hash = full_hash
    else:
        name = backbone or DEFAULT_BACKBONE
        encoder = build_encoder(name, weights).to(dev).eval()
        feature = feature or "backbone"
        size = image_size or RunConfig().data.image_size
        precision = "auto"
        # The baseline's head is random and unused: only the backbone decides its embeddings.
        full_hash = cache_hash = f"{name}:{state_dict_hash(encoder.backbone)}"
    check_image_size(size, "image_size")
    check_feature(feature)
    if feature == "head" and run is None:
        raise CheckpointError("feature 'head' needs a trained run folder (--run); the baseline has only 'backbone'")
    eval_transform(size)  # validates the size (multiple of 32) before any work
    channels_last = use_channels_last(dev, name)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)  # hashes were taken above (layout-independent)
    return LoadedModel(
        encoder=encoder,
        backbone=name,
        feature=feature,
        image_size=size,
        model_hash=full_hash,
        cache_key_hash=cache_hash,
        run_dir=run,
        device=dev,
        amp=amp_dtype(dev, precision, name),
        channels_last=channels_last,
        config=cfg,
        runtime=runtime,
    )


# ---------------------------------------------------------------------------------------------------------
# The run's indexes


def index_root(run: Path, index_dir: str | os.PathLike[str] | None) -> Path:
    """Where a run's index set lives: ``index_dir`` when given, else ``RUN_DIR/index``."""
    return Path(index_dir) if index_dir is not None else run / INDEX_DIR


def _recorded_build(root: Path) -> tuple[str | None, str | None]:
    """Best effort, for messages: the model hash and data root an index folder records (None if unreadable)."""
    try:
        meta = read_json(root / INDEX_SET_FILE)
        first = next(iter(meta["domains"].values()))
        manifest = read_json(root / first / MANIFEST_FILE)
        return str(meta.get("model_hash")), manifest.get("data_root")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None, None


def _mismatched_hash(root: Path, expected: str) -> str | None:
    """Best effort, for messages: a model hash recorded in ``root`` (index set, then each domain manifest)
    that differs from ``expected`` — the one that made loading fail; None when none is readable."""
    try:
        meta = read_json(root / INDEX_SET_FILE)
        recorded = [meta.get("model_hash")]
        for sub in meta["domains"].values():
            recorded.append(read_json(root / sub / MANIFEST_FILE).get("model_hash"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return next((str(h) for h in recorded if isinstance(h, str) and h != expected), None)


def load_run_index(
    run_dir: str | os.PathLike[str],
    *,
    index_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    use_gpu: UseGpu = "auto",
    on_stage: Callable[[str], None] | None = None,
) -> tuple[LoadedModel, IndexSet]:
    """A run's encoder and its saved indexes, checked to belong together.

    The embedding ``feature`` is the one the index recorded. An index built with another model (hash) or
    dimension is refused with :class:`IndexMismatchError` saying how to rebuild it. ``on_stage(message)``
    is told what is being loaded as each part starts (e.g. to print it).
    """
    say = on_stage or (lambda _message: None)
    say(f"loading the model from {Path(run_dir) / CHECKPOINT_FILE}")
    model = load_model(run_dir, device=device)
    assert model.run_dir is not None
    root = index_root(model.run_dir, index_dir)
    say(f"loading the indexes from {root}")
    recorded_hash, recorded_root = _recorded_build(root)
    rebuild = f"rerun `cdretrieval index --run {model.run_dir} --data {recorded_root or 'ROOT'}`"
    try:
        iset = IndexSet.load(root, expected_model_hash=model.model_hash, use_gpu=use_gpu)
    except IndexMismatchError as e:
        recorded_hash = _mismatched_hash(root, model.model_hash) or recorded_hash
        raise IndexMismatchError(
            f"the index in {root} was built with another model (hash {str(recorded_hash)[:12]}…) than the "
            f"run's checkpoint (hash {model.model_hash[:12]}…): the run was retrained or changed since; {rebuild}"
        ) from e
    first = iset[iset.domains[0]].manifest
    feature = str(first.get("feature", model.feature))
    for d in iset:
        if iset[d].manifest.get("feature", feature) != feature:
            raise IndexMismatchError(f"the domains in {root} were indexed with different features; {rebuild}")
    model = model.with_feature(feature)
    if iset.dim != model.dim:
        raise IndexMismatchError(
            f"the index in {root} holds {iset.dim}-d vectors but the run's {feature!r} feature is "
            f"{model.dim}-d; {rebuild}"
        )
    size = first.get("image_size", model.image_size)
    for d in iset:
        recorded = iset[d].manifest.get("image_size", size)
        check_image_size(recorded, f"the image_size recorded in {root / safe_domain_name(d) / MANIFEST_FILE}")
        if recorded != size:
            raise IndexMismatchError(f"the domains in {root} were indexed at different image sizes; {rebuild}")
    if size != model.image_size:
        model = dataclasses.replace(model, image_size=size)  # queries must be resized as the gallery was
    return model, iset

