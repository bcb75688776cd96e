"""Layers shared by the backbone, the FPN and the heads: normalisation choices, a convolution followed by
its normalisation, and batch-norm folding for inference.

Shorthand: N images (or R RoIs for the heads), C channels, H, W spatial size.

A module whose convolutions are followed by normalisations lists them in a ``conv_norm_pairs()`` method
returning ``(conv owner, conv attribute, norm owner, norm attribute)`` for each pair, with the
normalisation applied to the convolution's output and nothing in between. :func:`fold_batchnorm` folds
every such pair whose normalisation has fixed statistics (``FrozenBatchNorm2d``, ``BatchNorm2d`` /
``SyncBatchNorm`` in eval mode) into the convolution; ``GroupNorm`` depends on its input and stays.
"""

from __future__ import annotations

import copy
from typing import Iterator, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

# The normalisations :func:`make_norm` builds for the FPN and the heads.
HEAD_NORMS = ("", "bn", "gn")

ConvNormPair = Tuple[nn.Module, str, nn.Module, str]


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


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``; x: (N, C_in, H, W) -> (N, C_out, H', W').

    ``FrozenBatchNorm2d`` is the per-channel affine map ``y * scale + shift``, ``scale = gamma / sqrt(var +
    eps)`` and ``shift = beta - mean * scale``, applied here in place on the convolution's output in the
    output's dtype: in float32 the same arithmetic as ``FrozenBatchNorm2d`` (same results), under bfloat16
    autocast without its float32 output. Any other normalisation (``BatchNorm2d`` in either mode) runs as
    it is; an ``nn.Identity`` norm is one folded into the convolution by :func:`fold_batchnorm`.
    """
    y = conv(x)
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(y)
    scale, shift = _scale_and_shift(norm)
    return y.mul_(scale.to(y.dtype)[:, None, None]).add_(shift.to(y.dtype)[:, None, None])


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with each batch norm folded into the convolution before it.

    ``norm(conv(x))`` with fixed statistics equals one convolution with weights ``W * scale`` (one scale
    per output channel) and bias ``shift + b * scale`` (see :func:`conv_norm`), which saves the
    normalisation's two passes over the activations. Every pair listed by a ``conv_norm_pairs()`` method
    of ``module`` or its submodules is folded; outputs equal the original's to float rounding (the
    products are rounded in another order). The folded norms become ``nn.Identity``, so the copy's
    parameter names differ: keep the original for checkpoints. Raises ValueError for a batch norm using
    batch statistics (training mode).
    """
    return fold_batchnorm_(copy.deepcopy(module))


@torch.no_grad()
def fold_batchnorm_(module: nn.Module) -> nn.Module:
    """:func:`fold_batchnorm` in place: ``module`` itself is changed and returned."""
    pairs = [pair for m in module.modules() if hasattr(m, "conv_norm_pairs") for pair in m.conv_norm_pairs()]
    for conv_owner, conv_name, norm_owner, norm_name in pairs:
        conv, norm = getattr(conv_owner, conv_name), getattr(norm_owner, norm_name)
        if not isinstance(norm, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            continue  # Identity (nothing to fold) or GroupNorm (statistics of each input)
        if not _has_fixed_statistics(norm):
            raise ValueError("fold_batchnorm needs fixed normalisation statistics: put the model in eval mode")
        scale, bias = _scale_and_shift(norm)
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bias)
        fused.requires_grad_(False)
        setattr(conv_owner, conv_name, fused)
        setattr(norm_owner, norm_name, nn.Identity())
    return module


def paired_lists(convs: nn.ModuleList, norms: nn.ModuleList) -> Iterator[ConvNormPair]:
    """The ``conv_norm_pairs`` entries of two parallel lists: ``convs[i]`` followed by ``norms[i]``."""
    for i in range(len(convs)):
        yield convs, str(i), norms, str(i)


def _has_fixed_statistics(norm: nn.Module) -> bool:
    """True for ``FrozenBatchNorm2d`` and for a batch norm in eval mode with running statistics."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return not norm.training and norm.track_running_stats
    return isinstance(norm, FrozenBatchNorm2d)


def _scale_and_shift(norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """(C,) scale ``gamma / sqrt(var + eps)`` and (C,) shift ``beta - mean * scale`` of a fixed batch norm."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale
