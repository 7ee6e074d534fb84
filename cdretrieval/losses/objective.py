"""The training objective: which CDS/PCS terms are active at an epoch, and their values for one step.

The terms (see :mod:`cdretrieval.train` for the step they belong to) come from
:mod:`~cdretrieval.losses.cds`, :mod:`~cdretrieval.losses.pcs` and :mod:`~cdretrieval.losses.mim`. The
config was validated once (:func:`~cdretrieval.config.validate`) and the trainer builds every tensor
passed here, so the losses run with ``check=False``: no argument check, and no device sync, per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from cdretrieval.config import RunConfig
from cdretrieval.distributed import gather_rows_with_grad
from cdretrieval.losses.cds import cross_domain_entropy_loss, instance_discrimination_loss
from cdretrieval.losses.mim import MutualInformation
from cdretrieval.losses.pcs import cross_domain_prototype_entropy, multi_prototypical_loss
from cdretrieval.memory import MemoryBank
from cdretrieval.prototypes import Prototypes


def active_terms(cfg: RunConfig, epoch: int) -> dict[str, float]:
    """Terms with a positive weight whose start epoch has come: name → weight."""
    return {n: t.weight for n, t in cfg.losses.terms.items() if t.weight > 0 and epoch >= t.start_epoch}


def compute_losses(
    feats: Mapping[str, Tensor],
    idx: Mapping[str, Tensor],
    banks: MemoryBank,
    protos: Prototypes,
    mim: MutualInformation | None,
    cfg: RunConfig,
    terms: Mapping[str, float],
) -> dict[str, Tensor]:
    """The active loss terms (unweighted) for one step; the losses run unchecked (see the module docstring).

    Args:
        feats: domain → ``[b, D]`` L2-normalised embeddings of this rank's shard (with gradient).
        idx: domain → ``[b]`` bank positions of those samples.
        banks: per-domain memory banks (read only here).
        protos: this epoch's clusterings (needed by proto, cross_proto, mim).
        mim: MIM module holding the running marginal (needed by mim).
        terms: the active terms (see :func:`active_terms`).
    """
    lc = cfg.losses
    tau = lc.temperature
    domains = list(feats)
    out: dict[str, Tensor] = {}
    if "instance" in terms:
        out["instance"] = torch.stack(
            [instance_discrimination_loss(feats[d], banks.bank(d), idx[d], tau, check=False) for d in domains]
        ).mean()
    if "cross_instance" in terms:
        parts = []
        for d in domains:
            others = [o for o in domains if o != d]
            if lc.domain_pairing == "all_others":
                other_bank = torch.cat([banks.bank(o) for o in others])
                parts.append(cross_domain_entropy_loss(feats[d], other_bank, tau, lc.cross_topk, check=False))
            else:
                parts += [cross_domain_entropy_loss(feats[d], banks.bank(o), tau, lc.cross_topk, check=False)
                          for o in others]
        out["cross_instance"] = torch.stack(parts).mean()
    if "proto" in terms:
        out["proto"] = torch.stack(
            [multi_prototypical_loss(feats[d], idx[d], protos.per_domain[d], check=False) for d in domains]
        ).mean()
    if "cross_proto" in terms:
        parts = []
        for d in domains:
            for o in domains:
                if o != d:
                    parts += [cross_domain_prototype_entropy(feats[d], c.centroids, tau, check=False)
                              for c in protos.per_domain[o]]
        out["cross_proto"] = torch.stack(parts).mean()
    if "mim" in terms:
        if mim is None or protos.joint is None:
            raise RuntimeError("mim term active without joint prototypes")
        f_all = gather_rows_with_grad(torch.cat([feats[d] for d in domains]))  # [W·Σb, D]
        probs = F.softmax(f_all @ protos.joint.T / tau, dim=1)  # [W·Σb, K]
        out["mim"] = mim(probs, check=False)
    return out


__all__ = ["active_terms", "compute_losses"]
