from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdretrieval.data.folders import scan_domain
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import eval_transform
from cdretrieval.errors import CheckpointError
from cdretrieval.models.backbones import build_backbone, lite0_weights_path, split_backbone
from cdretrieval.models.encoder import build_encoder, state_dict_hash


def _nn_accuracy(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy under cosine similarity."""
    f = F.normalize(feats, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1)] == labels).float().mean())


def _two_class_batch(root: Path, domain: str, classes: tuple[str, str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = eval_transform(128)
    xs, ys = [], []
    samples = scan_domain(root, domain)
    for y, c in enumerate(classes):
        picked = [s for s in samples if s.label == c][:n]
        xs += [t(load_image(s.path)) for s in picked]
        ys += [y] * len(picked)
    return torch.stack(xs), torch.tensor(ys)


def test_lite0_weights_ship_offline_and_separate_classes(pacs_root: Path) -> None:
    assert lite0_weights_path().is_file()
    x, y = _two_class_batch(pacs_root, "photo", ("guitar", "elephant"), 12)
    with torch.no_grad():
        pre = build_backbone("efficientnet_lite0").eval()(x)
        torch.manual_seed(0)
        rand = build_backbone("efficientnet_lite0", weights="none").eval()(x)
    assert pre.shape == (24, 1280)
    acc_pre, acc_rand = _nn_accuracy(pre, y), _nn_accuracy(rand, y)
    assert acc_pre >= 0.95 and acc_pre > acc_rand


def test_lite0_static_padding_matches_dynamic_for_multiples_of_32() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    bb = build_backbone("efficientnet_lite0").eval()
    dyn = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    dyn.load_state_dict(state)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        a = bb(x)
        b = F.adaptive_avg_pool2d(dyn.extract_features((x - 127 / 255) / (128 / 255)), 1).flatten(1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resnet18_from_local_file_offline(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone("resnet18", weights=str(path)).eval()
    assert torch.equal(bb.body.conv1.weight, ref.conv1.weight)
    ref.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref.eval()((x - bb.mean) / bb.std)
        torch.testing.assert_close(bb(x), expected)


def test_bad_weights_and_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg")
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a loadable"):
        build_backbone("resnet18", weights=str(junk))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError):
        build_backbone("efficientnet_lite0", weights=str(tmp_path / "wrong.pth"))


def test_encoder_normalised_and_hash_tracks_weights() -> None:
    enc = build_encoder("resnet18", weights="none", hidden_dim=32, dim=16).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        z = enc(x)
        zb = enc.embed(x, "backbone")
    assert z.shape == (3, 16) and zb.shape == (3, 512)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    h = state_dict_hash(enc)
    assert h == state_dict_hash(enc)
    with torch.no_grad():
        enc.head.net[0].weight[0, 0] += 1  # first Linear of the head
    assert state_dict_hash(enc) != h


@pytest.mark.parametrize(("name", "units", "shape"), [
    ("efficientnet_lite0", 1, (320, 2, 2)), ("efficientnet_lite0", 2, (192, 2, 2)),
    ("efficientnet_lite0", 6, (112, 4, 4)), ("resnet18", 1, (256, 4, 4)), ("resnet18", 2, (128, 8, 8)),
])
def test_split_backbone_reproduces_the_backbone(name: str, units: int, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    bb = build_backbone(name, weights="default" if name == "efficientnet_lite0" else "none")
    bb.train()  # the split's probe must leave every mode (and BatchNorm statistic) as it found it
    stats = {k: v.clone() for k, v in bb.state_dict().items()}
    split = split_backbone(bb, units, 64)
    assert all(m.training for m in bb.modules()) and split.map_shape == shape
    for k, v in bb.state_dict().items():
        assert torch.equal(v, stats[k]), k
    bb.eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        maps = split.lower(x)
        assert maps.shape == (3, split.map_dim)
        torch.testing.assert_close(split.upper(maps), bb(x), rtol=1e-5, atol=1e-5)
    # upper shares the backbone's parameters: training it trains the backbone
    ids = {id(p) for p in bb.parameters()}
    assert {id(p) for p in split.upper.parameters()} <= ids and {id(p) for p in split.lower.parameters()} <= ids
    assert not {id(p) for p in split.upper.parameters()} & {id(p) for p in split.lower.parameters()}
    with pytest.raises(ValueError, match="trainable_units"):
        split_backbone(bb, len(bb.units()), 64)
