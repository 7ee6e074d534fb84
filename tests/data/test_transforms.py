import pytest
import torch
from PIL import Image

from cdretrieval.data.transforms import eval_transform, train_transform


def test_eval_is_deterministic_and_sized() -> None:
    img = Image.new("RGB", (100, 60), (255, 0, 0))
    t = eval_transform(64)
    a, b = t(img), t(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_train_is_random_but_seeded() -> None:
    img = Image.effect_noise((80, 80), 50).convert("RGB")
    t = train_transform(64)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("bad", [0, 50, 100])
def test_bad_sizes(bad: int) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        eval_transform(bad)
