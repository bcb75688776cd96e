"""Layers shared by the backbone, the FPN and the heads: normalisation choices, a convolution followed by
its normalisation (and a ReLU, or a residual sum and a ReLU), and batch-norm folding for inference.

Shorthand: N images (or R RoIs for the heads), C channels, H, W spatial size.

A module whose convolutions are followed by normalisations lists them in a ``conv_norm_pairs()`` method
returning ``(conv owner, conv attribute, norm owner, norm attribute)`` for each pair, with the
normalisation applied to the convolution's output and nothing in between. :func:`fold_batchnorm` folds
every such pair whose normalisation has fixed statistics (``FrozenBatchNorm2d``, ``BatchNorm2d`` /
``SyncBatchNorm`` in eval mode) into the convolution; ``GroupNorm`` depends on its input and stays.

In inference (nothing to differentiate, eager, channels-last CPU tensors) :func:`conv_relu`,
:func:`conv_norm_relu` and :func:`conv_norm_add_relu_` run the ReLU, and a residual block's sum, inside
oneDNN's convolution as it writes its output (``python -m benchmarks.fusion`` measures the gain).
"""

from __future__ import annotations

import contextlib
import copy
from functools import lru_cache
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
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


def conv_relu(conv: nn.Module, x: Tensor) -> Tensor:
    """``relu(conv(x))`` for an ``nn.Conv2d`` or ``nn.ConvTranspose2d``; x: (N, C_in, H, W) -> (N, C_out, H', W').

    When nothing needs a gradient, a channels-last CPU forward runs the ReLU inside oneDNN's convolution
    (see :func:`_runs_fused`), which saves a pass over the output. Float32 results equal the plain path's to
    float rounding (for some shapes oneDNN's fused kernel adds in another order)."""
    if not _runs_fused(conv, x):
        return F.relu(conv(x), inplace=True)
    x, weight, bias = _operands(conv, x)
    if isinstance(conv, nn.ConvTranspose2d):
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, weight, bias, conv.padding, conv.output_padding, conv.stride, conv.dilation, conv.groups,
            "relu", [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, conv.padding, conv.stride,
                                                   conv.dilation, conv.groups, "relu", [], None)


def conv_norm_relu(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(conv(x)))``; x: (N, C_in, H, W) -> (N, C_out, H', W'); fused as in :func:`conv_relu` when
    the norm is folded into the convolution (``nn.Identity``)."""
    if isinstance(norm, nn.Identity):
        return conv_relu(conv, x)
    return F.relu(conv_norm(conv, norm, x), inplace=True)


def conv_norm_add_relu_(conv: nn.Conv2d, norm: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """``relu(norm(conv(x)) + residual)``, written into ``residual`` (its old values are lost) when fused;
    x: (N, C_in, H, W), residual: (N, C_out, H', W').

    A residual block's last step. Fused as in :func:`conv_norm_relu`, oneDNN adds the convolution's output
    to ``residual`` in place, so the sum needs no memory of its own and no pass of its own. In bfloat16 the
    sum is rounded once, where the plain path rounds the convolution's output and then the sum."""
    if (isinstance(norm, nn.Identity) and _runs_fused(conv, x) and residual.dtype == _compute_dtype(x)
            and residual.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and residual.requires_grad)):
        x, weight, bias = _operands(conv, x)
        return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, weight, bias, conv.padding,
                                                               conv.stride, conv.dilation, conv.groups, "add",
                                                               1.0, "relu", [], None)
    return F.relu(conv_norm(conv, norm, x).add_(residual), inplace=True)


_FUSION = {"enabled": True}


@contextlib.contextmanager
def fused_convolutions(enabled: bool) -> Iterator[None]:
    """Allow (the default) or forbid the fused CPU convolutions of :func:`conv_relu`,
    :func:`conv_norm_relu` and :func:`conv_norm_add_relu_` inside the ``with`` block, to compare them with
    the plain operators (``python -m benchmarks.fusion``). The setting is the process's, not a thread's."""
    before = _FUSION["enabled"]
    _FUSION["enabled"] = enabled
    try:
        yield
    finally:
        _FUSION["enabled"] = before


def _runs_fused(conv: nn.Module, x: Tensor) -> bool:
    """Whether ``conv`` on ``x`` may run as one of oneDNN's fused CPU convolutions (unless
    :func:`fused_convolutions` forbids them): a channels-last float32 or bfloat16 forward (bfloat16
    autocast included) in eager mode (tracing and compiling keep the plain operators in their graphs),
    without autograd (the fused operators have no backward). In bfloat16 only where oneDNN has bf16 kernels:
    without them (an AVX2 CPU) its fused operators refuse bfloat16, and the plain ones emulate it."""
    autocast = torch.is_autocast_enabled("cpu")
    dtype = _compute_dtype(x)
    return (_FUSION["enabled"] and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and x.dtype in _FUSED_DTYPES and dtype in _FUSED_DTYPES
            and (dtype != torch.bfloat16 or _onednn_bf16())
            and (autocast or conv.weight.dtype == x.dtype)
            and x.is_contiguous(memory_format=torch.channels_last)
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


_FUSED_DTYPES = (torch.float32, torch.bfloat16)


@lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU under its ISA cap (``ONEDNN_MAX_CPU_ISA``)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU convolution of ``x`` computes in: autocast's where it is on, else ``x``'s."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _operands(conv: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``x``, the weight and the bias in :func:`_compute_dtype` (the casts that autocast makes)."""
    dtype = _compute_dtype(x)
    return x.to(dtype), conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)


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
