"""Mutual information maximisation (MIM) between embeddings and their prototype/class assignment.

PCS (Yue et al., CVPR 2021, §3.4), after Hu et al. (ICML 2017) and SHOT (Liang et al., ICML 2020):
I(x; c) = H(p̄) − E_x H(p(x)), with p(x) = ``[K]`` soft assignment of an embedding to the shared
prototypes (or classifier classes) and p̄ its marginal over the data. Maximising I makes each
assignment confident (low per-sample entropy) while the marginal stays spread (high entropy: no
collapse onto a few prototypes).

Weights, from the official PCS configs (e.g. ``config/officehome_Ar-Cl.json``: loss terms
``tgt-entmin`` 0.05 and ``tgt-condentmax`` 0.5): **per-sample entropy 0.05, marginal entropy 0.5**.

The marginal: one batch is a noisy estimate of p̄, so PCS keeps a running mean over the epoch
(``MomentumSoftmax``, reset each epoch) and minimises the cross-entropy −Σ p̄_batch·log p̄_running.
Here the running marginal (no gradient) is mixed with the batch mean (gradient flows) and the entropy
of the mixture is maximised; the gradient direction is the same (towards under-used prototypes) and
the value is a true entropy, bounded by log K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cdretrieval.validation import check_int, check_rows

# Clamp inside log so that p = 0 gives a finite gradient (p·log p → 0 as p → 0).
_LOG_EPS = 1e-8
# Tolerance on "each row of probs sums to 1" (loose enough for bf16/autocast softmax outputs).
_ROW_SUM_TOL = 1e-2


def _entropy(p: Tensor) -> Tensor:
    """Entropy (nats) along the last dim of probabilities ``p [..., K]``; returns ``[...]``."""
    return -(p * p.clamp_min(_LOG_EPS).log()).sum(dim=-1)


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_probs(p: Tensor) -> None:
    """``p [B, K]`` holds probability rows (softmax outputs, not logits)."""
    check_rows(p, "probs", "[B, K]")
    if p.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty 2-D [B, K] tensor, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("probs must be finite and non-negative (pass softmax outputs, not logits)")
    row_sums = p.sum(dim=1)
    if bool(((row_sums - 1.0).abs() > _ROW_SUM_TOL).any()):
        raise ValueError(
            f"each row of probs must sum to 1, got row sums in [{float(row_sums.min()):.4f}, "
            f"{float(row_sums.max()):.4f}] (pass softmax outputs, not logits)"
        )


def _check_momentum(momentum: float | None, what: str) -> None:
    if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be {what} in [0, 1), got {momentum!r}")


def mutual_information_loss(
    probs: Tensor,
    marginal: Tensor | None = None,
    momentum: float = 0.0,
    w_sample: float = 0.05,
    w_marginal: float = 0.5,
    *,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """PCS MIM loss: ``w_sample · mean_i H(p_i) − w_marginal · H(p̄)`` (PCS §3.4).

    p̄ = ``momentum · marginal + (1 − momentum) · mean_i p_i`` when a running ``marginal`` is given
    (``marginal`` is detached: the gradient flows through the batch mean only), else the batch mean.

    Args:
        probs: ``[B, K]`` soft assignments p_i (rows are probability vectors, e.g. a softmax over the
            prototypes or classes); computed in float32.
        marginal: ``[K]`` running estimate of the marginal assignment distribution, or ``None``.
        momentum: weight in ``[0, 1)`` of ``marginal`` in the mixture (ignored when it is ``None``).
        w_sample: weight of the per-sample entropy (minimised); PCS: 0.05.
        w_marginal: weight of the marginal entropy (maximised); PCS: 0.5.
        check: validate the arguments (False: trust the caller, no device sync).

    Returns:
        ``(loss, batch_marginal)``: scalar loss to minimise, and the ``[K]`` detached batch mean
        of ``probs`` (to update a running marginal; all-reduce it first under DDP).
    """
    p = probs.float()
    if check:
        _check_probs(p)
        _check_momentum(momentum, "a number")
        _check_weight("w_sample", w_sample)
        _check_weight("w_marginal", w_marginal)
        if marginal is not None and marginal.shape != (p.shape[1],):
            raise ValueError(f"marginal must have shape ({p.shape[1]},), got {tuple(marginal.shape)}")

    batch_marginal = p.mean(dim=0)  # [K]
    p_bar = batch_marginal
    if marginal is not None:
        p_bar = momentum * marginal.detach().to(p) + (1.0 - momentum) * batch_marginal  # [K]

    sample_entropy = _entropy(p).mean()  # mean_i H(p_i), minimised: confident assignments
    marginal_entropy = _entropy(p_bar)  # H(p̄), maximised: diverse assignments
    loss = w_sample * sample_entropy - w_marginal * marginal_entropy
    return loss, batch_marginal.detach()


class MutualInformation(nn.Module):
    """MIM loss with the running marginal kept as buffers (saved in ``state_dict`` / checkpoints).

    ``forward(probs [B, K]) -> loss`` calls :func:`mutual_information_loss` with the stored marginal,
    then updates it with the (detached) mixture used in the loss, so a training step both reads and
    refreshes the estimate.

    Args:
        num_prototypes: K, length of the assignment vectors.
        momentum: weight of the history in the running marginal, in ``[0, 1)``; ``None`` = cumulative
            mean over all samples since the last :meth:`reset`, weight ``n_seen / (n_seen + B)`` (the
            official PCS ``MomentumSoftmax``; call :meth:`reset` at each epoch start as PCS does).
            The first batch after construction or reset uses the batch mean alone.
        w_sample: per-sample entropy weight (PCS 0.05).
        w_marginal: marginal entropy weight (PCS 0.5).
    """

    marginal: Tensor
    num_seen: Tensor

    def __init__(
        self,
        num_prototypes: int,
        momentum: float | None = 0.9,
        w_sample: float = 0.05,
        w_marginal: float = 0.5,
    ) -> None:
        super().__init__()
        check_int(num_prototypes, "num_prototypes")
        if momentum is not None:
            _check_momentum(momentum, "None or a number")
        _check_weight("w_sample", w_sample)
        _check_weight("w_marginal", w_marginal)
        self.momentum = momentum
        self.w_sample = w_sample
        self.w_marginal = w_marginal
        self.register_buffer("marginal", torch.full((num_prototypes,), 1.0 / num_prototypes))  # [K]
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))  # samples since reset

    def reset(self) -> None:
        """Forget the running marginal (back to uniform, no samples seen)."""
        self.marginal.fill_(1.0 / self.marginal.numel())
        self.num_seen.zero_()

    def forward(self, probs: Tensor, *, check: bool = True) -> Tensor:
        """Return the MIM loss for ``probs [B, K]`` and update the running marginal (``check``: see
        :func:`mutual_information_loss`)."""
        batch = probs.shape[0] if probs.dim() == 2 else 0
        seen = int(self.num_seen)
        if seen == 0:
            weight = 0.0
        elif self.momentum is None:
            weight = seen / (seen + batch)
        else:
            weight = self.momentum
        loss, batch_marginal = mutual_information_loss(
            probs, self.marginal, weight, w_sample=self.w_sample, w_marginal=self.w_marginal, check=check
        )
        with torch.no_grad():
            self.marginal.copy_(weight * self.marginal + (1.0 - weight) * batch_marginal.to(self.marginal))
            self.num_seen += batch
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.marginal.numel()}, momentum={self.momentum}, "
            f"w_sample={self.w_sample}, w_marginal={self.w_marginal}"
        )


__all__ = ["MutualInformation", "mutual_information_loss"]
