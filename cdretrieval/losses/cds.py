"""CDS losses: in-domain instance discrimination and cross-domain entropy matching.

Kim, Cho, Yu, Lee, Kwak, "CDS: Cross-Domain Self-supervised Pre-training", ICCV 2021.

Notation: f = L2-normalised embeddings of a batch from domain d; V_d = memory bank of domain d (one
L2-normalised row per training image, see :class:`cdretrieval.memory.MemoryBank`); τ = temperature.
Banks are constants here: they are detached, the gradient reaches the features only.

Every loss checks its arguments unless called with ``check=False``: the trainer does so on every step,
since its config was validated once and the checks would read values back (a device sync) each step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from cdretrieval.validation import check_features_against, check_int, check_positions, check_positive


def softmax_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dimension.

    Args:
        logits: ``[B, K]`` unnormalised scores.

    Returns:
        ``[B]`` entropies H_i = −Σ_k p_ik log p_ik, computed from ``log_softmax`` (stable, no log 0).
    """
    log_p = F.log_softmax(logits, dim=-1)  # [B, K]
    return -(log_p.exp() * log_p).sum(dim=-1)


def instance_discrimination_loss(
    features: Tensor, bank: Tensor, indices: Tensor, temperature: float = 0.1, *, check: bool = True
) -> Tensor:
    """CDS in-domain instance discrimination (I-ID), Kim et al. ICCV 2021, eq. 1.

    L = −(1/B) Σ_i log [ exp(f_i·v_{i}/τ) / Σ_j exp(f_i·v_j/τ) ], with v_j the rows of the bank of the
    batch's own domain and v_{i} the bank row of sample i itself (non-parametric softmax).

    Args:
        features: ``[B, D]`` L2-normalised embeddings of a batch from one domain (gradient flows).
        bank: ``[N, D]`` memory bank of that same domain (detached: no gradient).
        indices: ``[B]`` int64 position of each sample in ``bank`` (the target class of eq. 1).
        temperature: τ > 0 (CDS: 0.1).
        check: validate the arguments (False: trust the caller, no device sync).

    Returns:
        Scalar loss, mean over the batch.
    """
    if check:
        check_features_against(features, bank, "bank")
        check_positive(temperature, "temperature")
        check_positions(indices, "indices", features.shape[0], bank.shape[0])

    logits = features @ bank.detach().to(features.dtype).T / temperature  # [B, N]
    return F.cross_entropy(logits, indices.to(logits.device))


def cross_domain_entropy_loss(
    features: Tensor, other_bank: Tensor, temperature: float = 0.1, topk: int | None = None, *, check: bool = True
) -> Tensor:
    """CDS cross-domain matching (CDM), Kim et al. ICCV 2021, eq. 2–3.

    p_i = softmax(f_i·V_{d'}ᵀ/τ) over the OTHER domain's bank (eq. 2); L = (1/B) Σ_i H(p_i) (eq. 3):
    minimising it makes each sample match a few cross-domain neighbours confidently.

    ``topk`` follows the official CDS code: only the k largest logits of each row enter the softmax (the
    rest are treated as probability 0), so far-away samples do not dilute the matching; k is clipped to
    the bank size M. ``None`` uses the whole bank (the paper's equation).

    Args:
        features: ``[B, D]`` L2-normalised embeddings from domain d (gradient flows).
        other_bank: ``[M, D]`` memory bank of another domain d' ≠ d (detached: no gradient).
        temperature: τ > 0 (CDS: 0.1).
        topk: keep the top-k logits per row before the softmax (official code: 700), or ``None``.
        check: validate the arguments (False: trust the caller).

    Returns:
        Scalar loss, mean entropy over the batch (nats).
    """
    if check:
        check_features_against(features, other_bank, "other_bank")
        check_positive(temperature, "temperature")
        if topk is not None:
            check_int(topk, "topk")

    logits = features @ other_bank.detach().to(features.dtype).T / temperature  # [B, M]
    if topk is not None and topk < logits.shape[1]:
        logits = logits.topk(topk, dim=1).values  # [B, k]; gradient flows through the kept entries
    return softmax_entropy(logits).mean()


__all__ = ["cross_domain_entropy_loss", "instance_discrimination_loss", "softmax_entropy"]
