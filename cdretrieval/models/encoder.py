"""The retrieval encoder: backbone → projection head → L2-normalised embedding.

Which feature goes into the index is a choice (``feature``): the head's embedding (trained by the
self-supervised losses, the default) or the backbone's pooled feature (normalised).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from cdretrieval.models.backbones import Backbone, build_backbone


class ProjectionHead(nn.Module):
    """MLP head ``[B,F] → [B,dim]``: Linear → ReLU → Linear (MoCo v2's head).

    No BatchNorm on purpose: per-sample computation makes distributed training give exactly the
    gradients of one process on the combined batch (BN statistics would depend on the local batch).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 256):
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"head dimensions must be ≥ 1, got {in_dim}, {hidden_dim}, {out_dim}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """``[B,3,H,W]`` in [0,1] → L2-normalised embedding ``[B, dim]``."""

    def __init__(self, backbone: Backbone, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def dim(self) -> int:
        return self.head.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone(x))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B,F]`` → normalised embedding ``[B,dim]`` (computed in fp32)."""
        return F.normalize(self.head(features.float()), dim=1)

    def embed(self, x: torch.Tensor, feature: str = "head") -> torch.Tensor:
        """Embedding used for retrieval: ``head`` (default) or ``backbone`` (normalised pooled features)."""
        if feature == "head":
            return self(x)
        if feature == "backbone":
            return F.normalize(self.backbone(x).float(), dim=1)
        raise ValueError(f"feature must be 'head' or 'backbone', got {feature!r}")

    def output_dim(self, feature: str = "head") -> int:
        return self.dim if feature == "head" else self.backbone.feature_dim


def build_encoder(
    backbone: str = "efficientnet_lite0", weights: str = "default", hidden_dim: int = 1024, dim: int = 256
) -> Encoder:
    """Backbone (see :func:`~cdretrieval.models.backbones.build_backbone`) plus a fresh projection head."""
    bb = build_backbone(backbone, weights)
    return Encoder(bb, ProjectionHead(bb.feature_dim, hidden_dim, dim))


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, shapes, bytes): identifies the model of an index."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
