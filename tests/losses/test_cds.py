"""CDS losses against explicit Python-loop references on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdretrieval.losses.cds import cross_domain_entropy_loss, instance_discrimination_loss, softmax_entropy

# Two samples, three bank rows, D = 3 (rows need not be normalised for the arithmetic checks).
FEATURES = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
BANK = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def test_instance_discrimination_matches_loop_reference() -> None:
    tau = 0.1
    indices = [2, 1]
    expected = 0.0
    for f, i in zip(FEATURES, indices, strict=True):
        p = _softmax([_dot(f, v) / tau for v in BANK])
        expected += -math.log(p[i])
    expected /= len(FEATURES)

    loss = instance_discrimination_loss(torch.tensor(FEATURES), torch.tensor(BANK), torch.tensor(indices), tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_instance_discrimination_by_hand_two_rows() -> None:
    # f = [1, 0], bank rows [1, 0] and [0, 1], τ = 1, target 0: loss = −log(e / (e + 1)).
    loss = instance_discrimination_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0]), temperature=1.0
    )
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1.0)), rel=1e-6)


def test_instance_discrimination_gradient_reaches_features_not_bank() -> None:
    features = torch.tensor(FEATURES, requires_grad=True)
    bank = torch.tensor(BANK, requires_grad=True)
    instance_discrimination_loss(features, bank, torch.tensor([0, 1])).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert bank.grad is None


def test_cross_domain_entropy_matches_loop_reference() -> None:
    tau = 0.1
    expected = sum(_entropy(_softmax([_dot(f, v) / tau for v in BANK])) for f in FEATURES) / len(FEATURES)
    loss = cross_domain_entropy_loss(torch.tensor(FEATURES), torch.tensor(BANK), tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cross_domain_entropy_topk_keeps_only_top_logits() -> None:
    tau = 0.5
    features = torch.tensor(FEATURES)
    bank = torch.tensor(BANK)
    expected = 0.0
    for f in FEATURES:
        logits = sorted((_dot(f, v) / tau for v in BANK), reverse=True)[:2]
        expected += _entropy(_softmax(logits))
    expected /= len(FEATURES)
    assert cross_domain_entropy_loss(features, bank, tau, topk=2).item() == pytest.approx(expected, rel=1e-5)
    # k = 1: a one-element softmax has zero entropy.
    assert cross_domain_entropy_loss(features, bank, tau, topk=1).item() == pytest.approx(0.0, abs=1e-7)
    # k >= M is clipped to M: identical to the full softmax.
    full = cross_domain_entropy_loss(features, bank, tau)
    assert cross_domain_entropy_loss(features, bank, tau, topk=3).item() == pytest.approx(full.item())
    assert cross_domain_entropy_loss(features, bank, tau, topk=700).item() == pytest.approx(full.item())
    assert cross_domain_entropy_loss(features, bank, tau, topk=2).item() < full.item()


def test_cross_domain_entropy_is_log_m_when_all_bank_rows_are_equidistant() -> None:
    features = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    other = torch.eye(4)[:3]  # three rows orthogonal to the feature
    assert cross_domain_entropy_loss(features, other).item() == pytest.approx(math.log(3), rel=1e-6)


def test_cross_domain_entropy_gradient_reaches_features_not_bank() -> None:
    features = F.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    features.requires_grad_(True)
    other = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    other.requires_grad_(True)
    cross_domain_entropy_loss(features, other, topk=3).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert other.grad is None


def test_softmax_entropy_values() -> None:
    h = softmax_entropy(torch.tensor([[0.0, 0.0], [100.0, -100.0]]))
    assert h[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("features", "bank", "indices", "temperature", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(4, 2), torch.tensor([0, 1]), 0.1, "dimension mismatch"),
        (torch.zeros(3), torch.zeros(4, 3), torch.tensor([0]), 0.1, "features"),
        (torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 4]), 0.1, r"\[0, 4\)"),
        (torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, -1]), 0.1, r"\[0, 4\)"),
        (torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0.0, 1.0]), 0.1, "int64"),
        (torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0]), 0.1, "shape"),
        (torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 1]), 0.0, "temperature"),
        (torch.zeros(0, 3), torch.zeros(4, 3), torch.zeros(0, dtype=torch.long), 0.1, "empty"),
    ],
)
def test_instance_discrimination_rejects_bad_input(features, bank, indices, temperature, match) -> None:
    with pytest.raises(ValueError, match=match):
        instance_discrimination_loss(features, bank, indices, temperature)


@pytest.mark.parametrize(("temperature", "topk"), [(-1.0, None), (float("nan"), None), (0.1, 0), (0.1, True)])
def test_cross_domain_entropy_rejects_bad_input(temperature: float, topk) -> None:
    with pytest.raises(ValueError):
        cross_domain_entropy_loss(torch.zeros(2, 3), torch.zeros(4, 3), temperature, topk)
