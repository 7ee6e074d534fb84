"""PCS mutual information maximisation: hand-computed values, gradients, running marginal."""

from __future__ import annotations

import math

import pytest
import torch

from cdretrieval.losses.mim import MutualInformation, mutual_information_loss


def _h(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def test_confident_and_diverse_batch_reaches_the_minimum() -> None:
    # One-hot rows on different prototypes: per-sample entropy 0, marginal [.5, .5] entropy log 2.
    loss, batch_marginal = mutual_information_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert loss.item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    assert batch_marginal.tolist() == pytest.approx([0.5, 0.5])


def test_uncertain_rows_pay_the_sample_entropy_weight() -> None:
    loss, _ = mutual_information_loss(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), w_sample=0.05, w_marginal=0.5)
    assert loss.item() == pytest.approx(0.05 * math.log(2) - 0.5 * math.log(2), rel=1e-6)


def test_loop_reference_with_running_marginal_mixture() -> None:
    probs = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    marginal = [0.6, 0.3, 0.1]
    momentum = 0.75
    batch_mean = [sum(col) / 2 for col in zip(*probs, strict=True)]
    mixture = [momentum * m + (1 - momentum) * b for m, b in zip(marginal, batch_mean, strict=True)]
    expected = 0.05 * sum(_h(p) for p in probs) / 2 - 0.5 * _h(mixture)

    loss, batch_marginal = mutual_information_loss(torch.tensor(probs), torch.tensor(marginal), momentum=momentum)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert batch_marginal.tolist() == pytest.approx(batch_mean)
    assert not batch_marginal.requires_grad


def test_gradient_flows_through_batch_part_not_running_marginal() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]], requires_grad=True)
    marginal = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    loss, _ = mutual_information_loss(torch.softmax(logits, dim=1), marginal, momentum=0.9)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert marginal.grad is None


def test_marginal_term_pushes_towards_underused_prototypes() -> None:
    # Every sample prefers prototype 0; the marginal term alone must lower that preference.
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss, _ = mutual_information_loss(torch.softmax(logits, dim=1), w_sample=0.0, w_marginal=1.0)
    loss.backward()
    assert logits.grad is not None
    assert bool((logits.grad[:, 0] > 0).all())  # gradient descent decreases logit 0


def test_module_first_batch_uses_batch_only_then_momentum() -> None:
    mim = MutualInformation(2, momentum=0.5)
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = mim(first)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # confident and collapsed: H(p̄) = 0
    assert mim.marginal.tolist() == pytest.approx([1.0, 0.0])
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    loss = mim(second)
    # p̄ = 0.5·[1, 0] + 0.5·[0, 1] = [.5, .5].
    assert loss.item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    assert mim.marginal.tolist() == pytest.approx([0.5, 0.5])
    assert int(mim.num_seen) == 4


def test_module_cumulative_mean_like_pcs() -> None:
    mim = MutualInformation(3, momentum=None)
    batches = [
        torch.tensor([[1.0, 0.0, 0.0]]),
        torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
        torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]]),
    ]
    for batch in batches:
        mim(batch)
    all_rows = torch.cat(batches)
    assert mim.marginal.tolist() == pytest.approx(all_rows.mean(dim=0).tolist(), rel=1e-6)
    mim.reset()
    assert mim.marginal.tolist() == pytest.approx([1 / 3] * 3)
    assert int(mim.num_seen) == 0


def test_module_state_dict_round_trip() -> None:
    mim = MutualInformation(2, momentum=0.9)
    mim(torch.tensor([[0.9, 0.1]]))
    restored = MutualInformation(2, momentum=0.9)
    restored.load_state_dict(mim.state_dict())
    assert torch.equal(restored.marginal, mim.marginal)
    assert int(restored.num_seen) == 1


@pytest.mark.parametrize(
    ("probs", "kwargs", "match"),
    [
        (torch.tensor([[2.0, -1.0]]), {}, "non-negative"),
        (torch.tensor([[0.5, 0.2]]), {}, "sum to 1"),
        (torch.tensor([0.5, 0.5]), {}, "2-D"),
        (torch.tensor([[0.5, 0.5]]), {"marginal": torch.tensor([1.0, 0.0, 0.0])}, "marginal"),
        (torch.tensor([[0.5, 0.5]]), {"momentum": 1.0}, "momentum"),
        (torch.tensor([[0.5, 0.5]]), {"w_sample": float("inf")}, "w_sample"),
    ],
)
def test_rejects_bad_input(probs, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        mutual_information_loss(probs, **kwargs)


def test_module_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="num_prototypes"):
        MutualInformation(0)
    with pytest.raises(ValueError, match="momentum"):
        MutualInformation(3, momentum=1.5)
