"""The run folder: what ``cdretrieval pretrain`` writes and every later command reads (``--run RUN_DIR``).

Layout::

    RUN_DIR/config.yaml        resolved RunConfig (human-readable, reloadable)
    RUN_DIR/checkpoint.pt      model, optimiser, scheduler, epoch/step, banks, config, RNG, version
    RUN_DIR/log.jsonl          per-step / per-epoch loss terms
    RUN_DIR/train_summary.json what the last ``pretrain`` call did: epochs, steps, mode, wall times
    RUN_DIR/index/             per-domain FAISS indexes (``cdretrieval index``)
    RUN_DIR/embeddings/        resumable embedding chunks (``cdretrieval embed``)

Every name above is defined once, here (``CONFIG_FILE``, ``CHECKPOINT_FILE``, ``LOG_FILE``, ``SUMMARY_FILE``,
``INDEX_DIR``, ``EMBEDDINGS_DIR``). Checkpoints are written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cdretrieval import __version__
from cdretrieval.config import RunConfig
from cdretrieval.errors import CheckpointError
from cdretrieval.io import atomic_torch_save, torch_load
from cdretrieval.models.encoder import Encoder, build_encoder, state_dict_hash

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "train_summary.json"
INDEX_DIR = "index"
EMBEDDINGS_DIR = "embeddings"


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def encoder_from_config(cfg: RunConfig, weights: str | None = None) -> Encoder:
    """A fresh encoder as the config describes it (``weights`` overrides ``cfg.model.weights``)."""
    m = cfg.model
    return build_encoder(m.backbone, weights or m.weights, m.hidden_dim, m.dim)


def save_checkpoint(run_dir: str | os.PathLike[str], state: dict[str, Any], cfg: RunConfig) -> Path:
    """Write ``state`` (must hold ``model``) plus format/version/config atomically to the run folder."""
    if "model" not in state:
        raise ValueError("checkpoint state needs a 'model' state dict")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / CONFIG_FILE)
    payload = {"format": CHECKPOINT_FORMAT, "cdretrieval": __version__, "config": cfg.to_dict(), **state}
    path = run / CHECKPOINT_FILE
    atomic_torch_save(payload, path)
    return path


def _load_error_summary(e: BaseException) -> str:
    """What went wrong in ``torch.load``, in one line, without PyTorch's advice to retry with
    ``weights_only=False`` (that would run whatever code the file holds: never)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return "refused by the safe loader: " + ln.removeprefix("WeightsUnpickler error:").strip()
    kept = [ln for ln in lines if "weights_only" not in ln and "arbitrary code" not in ln.lower()]
    if len(kept) < len(lines):
        return "refused by the safe loader" + (f": {kept[0]}" if kept and "Weights only load failed" not in kept[0]
                                                 else "")
    return kept[0] if kept else type(e).__name__


def load_checkpoint(run_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a run's checkpoint; :class:`CheckpointError` says what is wrong and what to do."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise CheckpointError(f"{run} is a file, not a run folder; pass the folder `cdretrieval pretrain --out` made")
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist; create it with `cdretrieval pretrain --out {run}`")
    path = run / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run} has no {CHECKPOINT_FILE}; train it first with `cdretrieval pretrain --out {run}`")
    try:
        ckpt = torch_load(path, map_location=map_location)
    except Exception as e:  # corrupt zip, unpickling refused, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({_load_error_summary(e)}); "
                              "retrain it or restore it from a backup") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a cdretrieval checkpoint")
    fmt = ckpt.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt!r} (cdretrieval {ckpt.get('cdretrieval')}) is not the supported "
            f"format {CHECKPOINT_FORMAT} (cdretrieval {__version__}); retrain with this version"
        )
    return ckpt


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The run's resolved config (from its checkpoint, which is authoritative)."""
    return RunConfig.from_dict(load_checkpoint(run_dir)["config"])


def load_encoder(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Encoder, RunConfig]:
    """Rebuild the trained encoder of a run, in eval mode on ``device``.

    The backbone is constructed without pretrained weights (the checkpoint has all of them), so loading
    needs no weights files and no network.
    """
    ckpt = load_checkpoint(run_dir)
    cfg = RunConfig.from_dict(ckpt["config"])
    enc = encoder_from_config(cfg, weights="none")
    try:
        enc.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint_path(run_dir)}: model weights do not fit the config ({e})") from e
    return enc.to(device).eval(), cfg


def model_hash(encoder: Encoder) -> str:
    """The identity of a model for index manifests (see :func:`state_dict_hash`)."""
    return state_dict_hash(encoder)
