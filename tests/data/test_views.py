"""MultiViewDataset: one decode, clean view first, augmented views seeded per (seed, view, index), RNG left alone."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cdretrieval.data.folders import Sample
from cdretrieval.data.transforms import eval_transform, train_transform
from cdretrieval.data.views import MultiViewDataset, view_seed


def _samples(tmp_path: Path, n: int = 4) -> list[Sample]:
    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.effect_noise((80, 72), 40 + 10 * i).convert("RGB").save(p)
        out.append(Sample(str(p), "d", None))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    return [*out, Sample(str(tmp_path / "bad.png"), "d", None)]


def test_views_are_seeded_per_view_and_index(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    ds = MultiViewDataset(samples, eval_transform(64), train_transform(64), views=3, seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    x, i, reason, size = ds[2]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
    assert x is not None and x.shape == (4, 3, 64, 64) and i == 2 and reason == "" and size == (80, 72)
    assert torch.equal(x[0], eval_transform(64)(Image.open(samples[2].path).convert("RGB")))
    assert len({x[v].sum().item() for v in range(4)}) == 4  # every view differs
    ds[0], ds[3]  # other items in between (another worker / batch order) change nothing
    again = ds[2][0]
    assert again is not None and torch.equal(x, again)
    other_seed = MultiViewDataset(samples, eval_transform(64), train_transform(64), views=3, seed=8)[2][0]
    assert other_seed is not None and torch.equal(other_seed[0], x[0]) and not torch.equal(other_seed[1], x[1])
    fewer = MultiViewDataset(samples, eval_transform(64), train_transform(64), views=1, seed=7)[2][0]
    assert fewer is not None and torch.equal(fewer, x[:2])  # view v does not depend on how many views there are


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    x, i, reason, size = MultiViewDataset(samples, eval_transform(64), train_transform(64), 2, 0)[4]
    assert x is None and i == 4 and "bad.png" in reason and size == (0, 0)


def test_view_seed_spreads() -> None:
    seeds = {view_seed(s, v, i) for s in range(3) for v in range(1, 5) for i in range(100)}
    assert len(seeds) == 3 * 4 * 100 and all(0 <= s < 2**63 for s in seeds)
