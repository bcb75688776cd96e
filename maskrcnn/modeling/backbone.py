"""ResNet trunk: stem + four stages, returning the stage outputs C2..C5.

Shorthand: N images, Hp/Wp padded input size. Stage ``k`` (k = 2..5) has stride ``2**k``.

The trunk reuses torchvision's ResNet building blocks (BasicBlock / Bottleneck), so its parameter
names match torchvision's ``resnet*`` models. Normalisation is ``FrozenBatchNorm2d`` by default
(statistics and affine parameters fixed, as detection fine-tuning uses at small batch sizes). The
forward runs each convolution + normalisation pair through :func:`conv_norm`; :func:`fold_batchnorm`
makes an inference copy with the normalisations folded into the convolutions.
"""

from __future__ import annotations

import copy
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
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
        self.conv1, self.bn1, self.maxpool = trunk.conv1, trunk.bn1, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        width = 64 if depth < 50 else 256
        self.out_channels = [width, width * 2, width * 4, width * 8]
        self.freeze_at = freeze_at
        parts = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for part in parts[:freeze_at]:
            for module in part:
                module.requires_grad_(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(F.relu(conv_norm(self.conv1, self.bn1, x), inplace=True))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = residual_block(block, x)
            outputs.append(x)
        return outputs


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """The forward of torchvision's ``BasicBlock`` / ``Bottleneck`` with every convolution + norm pair run
    by :func:`conv_norm`. x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
    identity = x if block.downsample is None else conv_norm(block.downsample[0], block.downsample[1], x)
    out = F.relu(conv_norm(block.conv1, block.bn1, x), inplace=True)
    if isinstance(block, tv_resnet.Bottleneck):
        out = F.relu(conv_norm(block.conv2, block.bn2, out), inplace=True)
        out = conv_norm(block.conv3, block.bn3, out)
    else:
        out = conv_norm(block.conv2, block.bn2, out)
    return F.relu(out.add_(identity), inplace=True)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``; x: (N, C_in, H, W) -> (N, C_out, H', W').

    A normalisation with fixed statistics (``FrozenBatchNorm2d``, or ``BatchNorm2d`` in eval mode) is the
    per-channel affine map ``y * scale + shift``, ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta - mean * scale``, applied here in place on the convolution's output in the output's
    dtype: in float32 the same arithmetic as ``FrozenBatchNorm2d`` (same results), under bfloat16
    autocast without its float32 output. A ``BatchNorm2d`` using batch statistics runs as it is; an
    ``nn.Identity`` norm is one folded into the convolution by :func:`fold_batchnorm`.
    """
    y = conv(x)
    if isinstance(norm, nn.Identity):
        return y
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or not norm.track_running_stats):
        return norm(y)
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
    shift = norm.bias - norm.running_mean * scale
    return y.mul_(scale.to(y.dtype)[:, None, None]).add_(shift.to(y.dtype)[:, None, None])


# The normalisations :func:`make_norm` builds for the FPN and the mask head.
HEAD_NORMS = ("", "bn", "gn")


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer named by ``kind`` (one of :data:`HEAD_NORMS`) for ``channels`` channels:
    "" -> Identity, "bn" -> BatchNorm2d, "gn" -> GroupNorm with 32 groups (fewer when ``channels`` is not
    a multiple of 32)."""
    if kind not in HEAD_NORMS:
        raise ValueError(f'norm must be "", "bn" or "gn", got {kind!r}')
    if kind == "":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


@torch.no_grad()
def fold_batchnorm(trunk: ResNet) -> ResNet:
    """An inference copy of ``trunk`` with each normalisation folded into the convolution before it.

    ``norm(conv(x))`` with fixed statistics equals one convolution with weights ``W * scale`` (one scale
    per output channel) and bias ``shift + b * scale`` (see :func:`conv_norm`), which saves the
    normalisation's two passes over the activations. Outputs equal the trunk's to float rounding (the
    products are rounded in another order). The norms become ``nn.Identity``, so the copy's parameter
    names differ: keep the original for checkpoints. Raises ValueError for a ``BatchNorm2d`` using batch
    statistics (training mode).
    """
    folded = copy.deepcopy(trunk)
    for parent, conv_name, norm_name in _conv_norm_pairs(folded):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or not norm.track_running_stats):
            raise ValueError("fold_batchnorm needs fixed normalisation statistics: put the model in eval mode")
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bias)
        fused.requires_grad_(False)
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
        raise FileNotFoundError(
            f"model.backbone.pretrained=true needs torchvision's ImageNet weights ({weights.url}), which could not be "
            f"downloaded: {exc}. Download the file on a machine with network access into "
            f"{torch.hub.get_dir()}/checkpoints/, or set model.backbone.pretrained=false."
        ) from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
