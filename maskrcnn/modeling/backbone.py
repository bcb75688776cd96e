"""ResNet trunk: stem + four stages, returning the stage outputs C2..C5.

Shorthand: N images, Hp/Wp padded input size. Stage ``k`` (k = 2..5) has stride ``2**k``.

The trunk reuses torchvision's ResNet building blocks (BasicBlock / Bottleneck), so its parameter
names match torchvision's ``resnet*`` models. Normalisation is ``FrozenBatchNorm2d`` by default
(statistics and affine parameters fixed, as detection fine-tuning uses at small batch sizes). The
forward runs each convolution + normalisation pair through :func:`~maskrcnn.modeling.layers.conv_norm`;
:meth:`ResNet.conv_norm_pairs` lists them for :func:`~maskrcnn.modeling.layers.fold_batchnorm`.
"""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

from ..config import BackboneConfig
from .layers import ConvNormPair, conv_norm, conv_norm_add_relu_, conv_norm_relu

_RESNETS = {18: tv_resnet.resnet18, 34: tv_resnet.resnet34, 50: tv_resnet.resnet50, 101: tv_resnet.resnet101}
_LAYOUTS = {18: (tv_resnet.BasicBlock, [2, 2, 2, 2]), 34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
            50: (tv_resnet.Bottleneck, [3, 4, 6, 3]), 101: (tv_resnet.Bottleneck, [3, 4, 23, 3])}
_IMAGENET_WEIGHTS = {
    18: tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
    34: tv_resnet.ResNet34_Weights.IMAGENET1K_V1,
    50: tv_resnet.ResNet50_Weights.IMAGENET1K_V1,
    101: tv_resnet.ResNet101_Weights.IMAGENET1K_V1,
}
_NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "syncbn": nn.SyncBatchNorm}


class ResNet(nn.Module):
    """ResNet-18/34/50/101 trunk.

    Args:
        depth: 18, 34, 50 or 101.
        norm: "frozen_bn", "bn" or "syncbn".
        width: channels of the stem and of the first stage's 3x3 convolutions; each later stage doubles
            them. 64 is torchvision's ResNet (the only width its ImageNet and COCO weights fit); 32 has a
            quarter of the trunk's multiply-adds, for small models trained from scratch.
        freeze_at: number of leading parts whose parameters get no gradient: 0 none, 1 the stem,
            2 the stem and res2 (the usual detection setting), ... 5 everything.
        pretrained: load torchvision's ImageNet weights (needs network access the first time).

    forward(x: (N, 3, Hp, Wp) float) -> [C2, C3, C4, C5], Ck of shape (N, out_channels[k-2], Hp/2**k, Wp/2**k).
    """

    def __init__(self, *, depth: int = BackboneConfig.depth, norm: str = BackboneConfig.norm,
                 freeze_at: int = BackboneConfig.freeze_at, width: int = BackboneConfig.width,
                 pretrained: bool = BackboneConfig.pretrained):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"backbone.depth must be one of {sorted(_RESNETS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"backbone.norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"backbone.freeze_at must be in 0..5, got {freeze_at}")
        if width < 1:
            raise ValueError(f"backbone.width must be positive, got {width}")
        if pretrained and width != 64:
            raise ValueError(f"backbone.pretrained needs backbone.width 64 (ImageNet weights), got {width}")
        if width == 64:
            trunk = _RESNETS[depth](weights=None, norm_layer=_NORMS[norm])
        else:
            trunk = resnet_trunk(depth, width, _NORMS[norm])
        if pretrained:
            trunk.load_state_dict(_load_imagenet_state(depth))
        self.conv1, self.bn1, self.maxpool = trunk.conv1, trunk.bn1, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        expansion = _LAYOUTS[depth][0].expansion
        self.out_channels = [width * expansion * 2 ** k for k in range(4)]
        self.freeze_at = freeze_at
        parts = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for part in parts[:freeze_at]:
            for module in part:
                module.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(conv_norm_relu(self.conv1, self.bn1, x))
        outputs = []  # each stage's first block downsamples, so no block overwrites a stage output
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = residual_block(block, x)
            outputs.append(x)
        return outputs

    def conv_norm_pairs(self) -> Iterator[ConvNormPair]:
        """Every convolution + normalisation pair (see :mod:`~maskrcnn.modeling.layers`)."""
        yield self, "conv1", self, "bn1"
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                for k in (1, 2, 3):
                    if hasattr(block, f"conv{k}"):
                        yield block, f"conv{k}", block, f"bn{k}"
                if block.downsample is not None:
                    yield block.downsample, "0", block.downsample, "1"


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """The forward of torchvision's ``BasicBlock`` / ``Bottleneck`` with every convolution + norm pair run
    by :func:`conv_norm` (or its fused forms, see :mod:`~maskrcnn.modeling.layers`).
    x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride). Without a downsample branch the sum may be
    written into ``x``'s memory: the caller must not keep ``x``."""
    identity = x if block.downsample is None else conv_norm(block.downsample[0], block.downsample[1], x)
    out = conv_norm_relu(block.conv1, block.bn1, x)
    if isinstance(block, tv_resnet.Bottleneck):
        out = conv_norm_relu(block.conv2, block.bn2, out)
        return conv_norm_add_relu_(block.conv3, block.bn3, out, identity)
    return conv_norm_add_relu_(block.conv2, block.bn2, out, identity)


def resnet_trunk(depth: int, width: int, norm_layer) -> nn.Module:
    """torchvision's ResNet layout (module names, blocks, initialisation) with ``width`` stem channels
    instead of 64: stage k's blocks have ``width * 2**k`` planes (k = 0..3)."""
    block, counts = _LAYOUTS[depth]
    trunk = nn.Module()
    trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1 = norm_layer(width)
    trunk.relu = nn.ReLU(inplace=True)  # children in torchvision's order, for IntermediateLayerGetter
    trunk.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = width
    for k, count in enumerate(counts):
        planes, stride = width * 2 ** k, 1 if k == 0 else 2
        blocks = []
        for i in range(count):
            downsample = None
            if i == 0 and (stride != 1 or inplanes != planes * block.expansion):
                downsample = nn.Sequential(tv_resnet.conv1x1(inplanes, planes * block.expansion, stride),
                                           norm_layer(planes * block.expansion))
            blocks.append(block(inplanes, planes, stride if i == 0 else 1, downsample, norm_layer=norm_layer))
            inplanes = planes * block.expansion
        setattr(trunk, f"layer{k + 1}", nn.Sequential(*blocks))
    for module in trunk.modules():  # as torchvision's ResNet initialises (its norms start at 1 and 0 already)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk


def _load_imagenet_state(depth: int) -> dict:
    """torchvision's ImageNet weights for the trunk (classifier dropped); clear error when offline."""
    weights = _IMAGENET_WEIGHTS[depth]
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # urllib/HTTP/OS errors all mean the same thing here
        raise FileNotFoundError(
            f"model.backbone.pretrained=true needs torchvision's ImageNet weights ({weights.url}), which could not be "
            f"downloaded: {exc}. Download the file on a machine with network access into "
            f"{torch.hub.get_dir()}/checkpoints/, or set model.backbone.pretrained=false."
        ) from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
