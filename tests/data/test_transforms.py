from collections.abc import Callable
from pathlib import Path

import numpy as np
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


def _torchvision_eval(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform as it was: torchvision's Resize (antialiased) + CenterCrop + ToTensor."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor()])  # type: ignore[no-any-return]


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_eval_equals_torchvision_on_shapes(size: int) -> None:
    """Bit for bit equal on portrait, landscape, square, smaller-than-size, odd and exact-size images."""
    rng = np.random.default_rng(size)
    shapes = [(100, 60), (60, 100), (size, size), (size, 3 * size + 1), (17, 9), (333, 257), (size + 1, size),
              (1, 50), (640, 480), (227, 227)]
    reference = _torchvision_eval(size)
    ours = eval_transform(size)
    for w, h in shapes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        a, b = ours(img), reference(img)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (3, size, size), (w, h)
        assert torch.equal(a, b), (w, h)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "CMYK"])
def test_eval_equals_torchvision_on_modes(mode: str) -> None:
    img = Image.effect_noise((90, 70), 60).convert("RGB").convert(mode)
    a, b = eval_transform(64)(img), _torchvision_eval(64)(img)
    assert a.shape == b.shape and torch.equal(a, b)


def test_eval_refuses_wide_modes() -> None:
    with pytest.raises(ValueError, match="8-bit"):
        eval_transform(64)(Image.new("F", (80, 80)))


def _assert_equal_to_torchvision(images: list[Image.Image], sizes: tuple[int, ...] = (64, 128, 224)) -> None:
    for size in sizes:
        reference, ours = _torchvision_eval(size), eval_transform(size)
        for n, img in enumerate(images):
            assert torch.equal(ours(img), reference(img)), (size, n, img.size, img.mode)


def test_eval_equals_torchvision_on_real_photos() -> None:
    """scikit-learn's two sample photos (640×427) and crops of them at awkward sizes, portrait and landscape."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    crops = [p.crop((0, 0, w, h)) for p in photos for w, h in [(427, 640 - 213), (129, 300), (301, 97), (160, 160)]]
    _assert_equal_to_torchvision(photos + crops)


def test_eval_equals_torchvision_on_demo_images(tmp_path: Path) -> None:
    """The embedded demo data set's images, decoded as the package decodes them."""
    from cdretrieval.data.demo import generate_demo_data
    from cdretrieval.data.images import load_image

    demo = generate_demo_data(tmp_path / "demo", per_domain=12)
    _assert_equal_to_torchvision([load_image(p) for p in sorted(demo.rglob("*.png"))[:24]])


def test_eval_equals_torchvision_on_pacs(pacs_root: Path) -> None:
    """PACS images of every domain (RGB photos, paintings and cartoons; greyscale sketches), decoded to RGB."""
    from cdretrieval.data.images import load_image

    domains = ("photo", "art_painting", "cartoon", "sketch")
    paths = [p for d in domains for p in sorted((pacs_root / d).rglob("*"))[::300] if p.is_file()]
    assert len(paths) >= 20
    _assert_equal_to_torchvision([load_image(p) for p in paths])
