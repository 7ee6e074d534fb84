"""Process-group helpers for training and embedding under ``torchrun``: rank, world size, gathers, a broadcast.

Every helper is a no-op (or the identity) in a single process, so training and embedding code calls them
unconditionally. Rows are gathered in rank order, so every rank sees the same global batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:$LOCAL_RANK`` under ``torchrun`` (one GPU
    per process on each machine); anything else is returned as it is."""
    local = os.environ.get("LOCAL_RANK")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device.type == "cuda" and device.index is None and local is not None and several:
        return torch.device("cuda", int(local))
    return device


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x [b, ...]`` from every rank (equal b), no gradient: ``[W·b, ...]`` in rank order."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and returns this
    rank's slice: with the same loss on every rank and DDP's gradient averaging this yields exactly
    the single-process gradient of that loss on the combined batch."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # x: [b, ...] → [W·b, ...]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_rows_with_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_rows` but the gradient flows back to every rank's own slice."""
    if world_size() == 1:
        return x
    out: Tensor = _GatherWithGrad.apply(x)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; other ranks may pass None)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()


def check_all_ranks(error: BaseException | None, what: str) -> None:
    """Collective: every rank reports its own failure of step ``what`` (its exception, or None); raises on
    every rank when any failed — the rank's own exception where it failed, else a ``RuntimeError`` naming the
    first failed rank and its error — so no rank waits for a failed one in a later collective until the
    process group's timeout. A single process just re-raises ``error``."""
    reports = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise RuntimeError(f"rank {r} failed while {what}: {msg}")


def mean_over_ranks(values: Tensor) -> Tensor:
    """The mean of ``values`` over the ranks (a sum all-reduce, divided); ``values`` itself when alone."""
    if world_size() == 1:
        return values
    dist.all_reduce(values)
    return values / world_size()


__all__ = [
    "barrier",
    "broadcast_object",
    "check_all_ranks",
    "gather_objects",
    "gather_rows",
    "gather_rows_with_grad",
    "init_distributed",
    "local_device",
    "mean_over_ranks",
    "rank",
    "world_size",
]
