"""Optional few-shot adaptive prototype classifier (PCS §3.4, "Adaptive Prototypical Classifier").

When a few labels exist, PCS sets the weight of class c of a cosine classifier to the L2-normalised
mean of the memory-bank features of the labelled (or confidently pseudo-labelled) samples of c, and
re-loads it during training (``_load_fewshot_to_cls_weight`` in the official code). The logits are
cosine similarities divided by a temperature (PCS ``CosineClassifier``, T = 0.05).

Unsupervised retrieval has no labels, so this is off by default; the trainer decides.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from cdretrieval.validation import check_int, check_positive, check_rows


@torch.no_grad()
def class_prototypes(bank: Tensor, labels: Tensor, num_classes: int, min_count: int = 1) -> Tensor:
    """Class weights = L2-normalised mean bank feature of each class's labelled samples.

    Args:
        bank: ``[N, D]`` memory-bank features (L2-normalised rows).
        labels: ``[N]`` int64 class of each row in ``[0, num_classes)``, or -1 for unlabelled.
        num_classes: C.
        min_count: a class needs at least this many labelled rows to get a prototype (PCS uses 1 for
            true few-shot labels and a higher threshold for pseudo-labels).

    Returns:
        ``[C, D]`` prototypes; a class with fewer than ``min_count`` labelled rows gets a zero row (so
        its logit is 0) and a ``UserWarning`` lists those classes.
    """
    check_rows(bank, "bank")
    if labels.shape != (bank.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be an int64 tensor of shape ({bank.shape[0]},), got shape {tuple(labels.shape)} "
            f"and dtype {labels.dtype}"
        )
    check_int(num_classes, "num_classes")
    check_int(min_count, "min_count")
    if bool((labels < -1).any()) or bool((labels >= num_classes).any()):
        raise ValueError(
            f"labels must be -1 (unlabelled) or in [0, {num_classes}), got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )

    labels = labels.to(bank.device)
    labelled = labels >= 0  # [N]
    features = bank.detach()[labelled]  # [L, D]
    classes = labels[labelled]  # [L]
    sums = torch.zeros(num_classes, bank.shape[1], dtype=bank.dtype, device=bank.device)
    sums.index_add_(0, classes, features)  # [C, D]
    counts = torch.bincount(classes, minlength=num_classes)  # [C]
    # The mean's direction equals the sum's direction, so normalising the sum is enough.
    prototypes = F.normalize(sums, dim=1)
    missing = (counts < min_count).nonzero().flatten().tolist()
    if missing:
        prototypes[missing] = 0.0
        warnings.warn(
            f"class_prototypes: {len(missing)} of {num_classes} classes have fewer than {min_count} labelled "
            f"samples and get a zero prototype: {missing[:20]}{' ...' if len(missing) > 20 else ''}",
            UserWarning,
            stacklevel=2,
        )
    return prototypes


def prototype_logits(features: Tensor, prototypes: Tensor, temperature: float = 0.05, *, check: bool = True) -> Tensor:
    """Cosine-classifier logits ``f·Wᵀ/T`` of embeddings against class prototypes (PCS §3.4).

    Args:
        features: ``[B, D]`` L2-normalised embeddings (gradient flows).
        prototypes: ``[C, D]`` class prototypes from :func:`class_prototypes`. Not detached: pass
            ``W.detach()`` for fixed prototypes, or an ``nn.Parameter`` initialised from them to learn
            the classifier as PCS does.
        temperature: T > 0 (PCS: 0.05).
        check: validate the arguments (False: trust the caller, e.g. in a training step).

    Returns:
        ``[B, C]`` logits (``softmax`` of them is the ``probs`` input of the MIM loss).
    """
    if check:
        if features.dim() != 2 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
            raise ValueError(
                f"features [B, D] and prototypes [C, D] must share D, got shapes {tuple(features.shape)} "
                f"and {tuple(prototypes.shape)}"
            )
        check_positive(temperature, "temperature")
    return features @ prototypes.to(features.dtype).T / temperature  # [B, C]


__all__ = ["class_prototypes", "prototype_logits"]
