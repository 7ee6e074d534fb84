"""Per-domain memory banks: momentum update by hand, normalisation, state_dict, validation."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cdretrieval.memory import MemoryBank

SIZES = {"Real World": 3, "a.b": 2}


def test_banks_are_unit_rows_with_safe_buffer_names() -> None:
    memory = MemoryBank(SIZES, dim=4)
    assert memory.domains == ["Real World", "a.b"]
    assert memory.bank("Real World").shape == (3, 4)
    assert memory.bank("a.b").shape == (2, 4)
    assert torch.allclose(memory.bank("a.b").norm(dim=1), torch.ones(2))
    names = {name for name, _ in memory.named_buffers()}
    assert names == {"bank_0", "bank_1", "filled_0", "filled_1"}


def test_fill_normalises_and_marks_rows() -> None:
    memory = MemoryBank(SIZES, dim=2)
    memory.fill("a.b", torch.tensor([1]), torch.tensor([[3.0, 4.0]]))
    assert memory.bank("a.b")[1].tolist() == pytest.approx([0.6, 0.8])
    assert memory.filled("a.b").tolist() == [False, True]
    assert not memory.is_full("a.b")
    memory.fill("a.b", torch.tensor([0]), torch.tensor([[0.0, 2.0]]))
    assert memory.is_full("a.b")


def test_momentum_update_by_hand() -> None:
    memory = MemoryBank({"photo": 2}, dim=3)
    memory.fill("photo", torch.tensor([0, 1]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    # V[0] = [1, 0, 0], f = [0, 2, 0] → normalise(0.5·[1,0,0] + 0.5·[0,1,0]) = [1/√2, 1/√2, 0].
    memory.update("photo", torch.tensor([0]), torch.tensor([[0.0, 2.0, 0.0]]), momentum=0.5)
    s = 1 / math.sqrt(2)
    assert memory.bank("photo")[0].tolist() == pytest.approx([s, s, 0.0])
    assert memory.bank("photo")[1].tolist() == pytest.approx([0.0, 0.0, 1.0])  # untouched row
    # m = 0.75: normalise(0.75·[s, s, 0] + 0.25·[0, 0, 1]).
    memory.update("photo", torch.tensor([0]), torch.tensor([[0.0, 0.0, 1.0]]), momentum=0.75)
    raw = [0.75 * s, 0.75 * s, 0.25]
    norm = math.sqrt(sum(v * v for v in raw))
    assert memory.bank("photo")[0].tolist() == pytest.approx([v / norm for v in raw])


def test_repeated_index_last_update_wins() -> None:
    """A batch that repeats rows (an epoch's wrapped-around permutation) updates each row once, from its
    last occurrence, on every run: sizes large enough that index assignment runs on several threads."""
    torch.manual_seed(0)
    n, b, dim = 50, 256, 256
    indices = torch.randint(n, (b,))
    features = torch.randn(b, dim)
    expected = MemoryBank({"photo": n}, dim=dim, seed=3)
    last = {int(row): i for i, row in enumerate(indices)}
    keep = torch.tensor(sorted(last.values()))
    expected.update("photo", indices[keep], features[keep], momentum=0.5)  # no repeats left
    for _ in range(30):  # plain index assignment gave ~30 different banks in 300 tries
        memory = MemoryBank({"photo": n}, dim=dim, seed=3)
        memory.update("photo", indices, features, momentum=0.5)
        assert torch.equal(memory.bank("photo"), expected.bank("photo"))


def test_update_takes_no_gradient() -> None:
    memory = MemoryBank({"photo": 2}, dim=3)
    features = torch.randn(2, 3, requires_grad=True)
    memory.update("photo", torch.tensor([0, 1]), features * 2)
    assert not memory.bank("photo").requires_grad
    assert memory.bank("photo").grad_fn is None


def test_state_dict_round_trip_through_bytes() -> None:
    memory = MemoryBank(SIZES, dim=4, seed=1)
    memory.fill("Real World", torch.tensor([2]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryBank(SIZES, dim=4, seed=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for domain in SIZES:
        assert torch.equal(restored.bank(domain), memory.bank(domain))
        assert torch.equal(restored.filled(domain), memory.filled(domain))


def test_state_dict_for_other_domains_is_refused() -> None:
    state = MemoryBank({"photo": 2, "sketch": 2}, dim=4).state_dict()
    with pytest.raises(ValueError, match="saved for domains"):
        MemoryBank({"sketch": 2, "photo": 2}, dim=4).load_state_dict(state)


@pytest.mark.parametrize(
    ("domain", "indices", "features", "match"),
    [
        ("clipart", torch.tensor([0]), torch.ones(1, 4), "unknown domain"),
        ("a.b", torch.tensor([2]), torch.ones(1, 4), r"\[0, 2\)"),
        ("a.b", torch.tensor([-1]), torch.ones(1, 4), r"\[0, 2\)"),
        ("a.b", torch.tensor([0]), torch.ones(1, 3), "shape"),
        ("a.b", torch.tensor([0, 1]), torch.ones(1, 4), "shape"),
        ("a.b", torch.tensor([0.0]), torch.ones(1, 4), "int64"),
    ],
)
def test_bad_batches_are_rejected(domain, indices, features, match) -> None:
    memory = MemoryBank(SIZES, dim=4)
    with pytest.raises(ValueError, match=match):
        memory.update(domain, indices, features)
    with pytest.raises(ValueError, match=match):
        memory.fill(domain, indices, features)


def test_bad_construction_and_momentum_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one domain"):
        MemoryBank({}, dim=4)
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(SIZES, dim=0)
    with pytest.raises(ValueError, match="size of domain"):
        MemoryBank({"photo": 0}, dim=4)
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(SIZES, dim=4).update("a.b", torch.tensor([0]), torch.ones(1, 4), momentum=1.5)
