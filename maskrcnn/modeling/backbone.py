"""ResNet trunk: stem + four stages, returning the stage outputs C2..C5.

Shorthand: N images, Hp/Wp padded input size. Stage ``k`` (k = 2..5) has stride ``2**k``.

The trunk reuses torchvision's ResNet building blocks (BasicBlock / Bottleneck), so its parameter
names match torchvision's ``resnet*`` models. Normalisation is ``FrozenBatchNorm2d`` by default
(statistics and affine parameters fixed, as detection fine-tuning uses at small batch sizes).
"""

from __future__ import annotations

import copy
from typing import Iterator, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

_RESNETS = {18: tv_resnet.resnet18, 34: tv_resnet.resnet34, 50: tv_resnet.resnet50, 101: tv_resnet.resnet101}
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
        freeze_at: number of leading parts whose parameters get no gradient: 0 none, 1 the stem,
            2 the stem and res2 (the usual detection setting), ... 5 everything.
        pretrained: load torchvision's ImageNet weights (needs network access the first time).

    forward(x: (N, 3, Hp, Wp) float) -> [C2, C3, C4, C5], Ck of shape (N, out_channels[k-2], Hp/2**k, Wp/2**k).
    """

    def __init__(self, *, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, pretrained: bool = False):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"backbone.depth must be one of {sorted(_RESNETS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"backbone.norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"backbone.freeze_at must be in 0..5, got {freeze_at}")
        trunk = _RESNETS[depth](weights=None, norm_layer=_NORMS[norm])
        if pretrained:
            trunk.load_state_dict(_load_imagenet_state(depth))
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        width = 64 if depth < 50 else 256
        self.out_channels = [width, width * 2, width * 4, width * 8]
        self.freeze_at = freeze_at
        parts = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for part in parts[:freeze_at]:
            for module in part:
                module.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


@torch.no_grad()
def fold_batchnorm(trunk: ResNet) -> ResNet:
    """An inference copy of ``trunk`` with each normalisation folded into the convolution before it.

    Every normalisation of the trunk directly follows a convolution, so ``norm(conv(x))``, an affine map
    per channel once the statistics are fixed (``FrozenBatchNorm2d``, or ``BatchNorm2d`` in eval mode),
    equals ``conv'(x)`` with weights ``W * scale`` (one scale per output channel) and a bias. The copy
    computes the same function to float rounding, without the per-pixel normalisation pass. Its parameter
    names differ (the ``bn*`` entries are gone, the convolutions gain biases): keep the original for
    checkpoints. Raises ValueError for a BatchNorm2d trunk in training mode (its statistics are not fixed).
    """
    folded = copy.deepcopy(trunk)
    for parent, conv_name, norm_name in _conv_norm_pairs(folded):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training:
            raise ValueError("fold_batchnorm needs fixed statistics: put the model in eval mode first")
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        fused.bias.copy_(norm.bias + (conv_bias - norm.running_mean) * scale)
        fused.requires_grad_(conv.weight.requires_grad)
        setattr(parent, conv_name, fused)
        setattr(parent, norm_name, nn.Identity())
    return folded


def _conv_norm_pairs(trunk: ResNet) -> Iterator[Tuple[nn.Module, str, str]]:
    """``(parent module, convolution name, normalisation name)`` of every convolution + norm pair."""
    yield trunk, "conv1", "bn1"
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        for block in layer:
            for k in (1, 2, 3):
                if hasattr(block, f"conv{k}"):
                    yield block, f"conv{k}", f"bn{k}"
            if block.downsample is not None:
                yield block.downsample, "0", "1"


def _load_imagenet_state(depth: int) -> dict:
    """torchvision's ImageNet weights for the trunk (classifier dropped); clear error when offline."""
    weights = _IMAGENET_WEIGHTS[depth]
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # urllib/HTTP/OS errors all mean the same thing here
        raise RuntimeError(
            f"backbone.pretrained=true needs torchvision's ImageNet weights ({weights.url}), which could not be "
            f"downloaded: {exc}. Download the file on a machine with network access into "
            f"{torch.hub.get_dir()}/checkpoints/, or set backbone.pretrained=false."
        ) from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
