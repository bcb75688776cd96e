"""Feature pyramid: lateral 1x1 convs, a top-down nearest-neighbour path, 3x3 output convs.

Shorthand: N images; level Pk has stride 2**k and shape (N, C, Hk, Wk), C = ``out_channels``.
Inputs C2..C5 from the trunk; outputs P2..P5 plus P6, a stride-2 subsampling of P5 (max-pool with
kernel 1), used by the RPN only.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BackboneConfig
from .layers import ConvNormPair, make_norm, paired_lists


class FPN(nn.Module):
    """Args:
        in_channels: channels of C2..C5.
        out_channels: channels of every output level.
        norm: normalisation after each lateral and output convolution: "" (none, the standard FPN), "bn"
            or "gn" (see :func:`~maskrcnn.modeling.layers.make_norm`); with a norm the convolutions
            have no bias.

    forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6].
    """

    strides = (4, 8, 16, 32, 64)

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = BackboneConfig.fpn_channels,
                 norm: str = BackboneConfig.fpn_norm):
        super().__init__()
        bias = not norm
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=bias) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
                                          for _ in in_channels)
        self.lateral_norms = nn.ModuleList(make_norm(norm, out_channels) for _ in in_channels)
        self.output_norms = nn.ModuleList(make_norm(norm, out_channels) for _ in in_channels)
        self.out_channels = out_channels
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        top_down = self.lateral(len(features) - 1, features[-1])
        outputs = [self.output(len(features) - 1, top_down)]
        for level in range(len(features) - 2, -1, -1):
            top_down = add_upsampled(self.lateral(level, features[level]), top_down)
            outputs.insert(0, self.output(level, top_down))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs

    def conv_norm_pairs(self) -> Iterator[ConvNormPair]:
        """Each convolution with the normalisation after it (see :mod:`~maskrcnn.modeling.layers`)."""
        yield from paired_lists(self.lateral_convs, self.lateral_norms)
        yield from paired_lists(self.output_convs, self.output_norms)

    def lateral(self, level: int, x: Tensor) -> Tensor:
        return self.lateral_norms[level](self.lateral_convs[level](x))

    def output(self, level: int, x: Tensor) -> Tensor:
        return self.output_norms[level](self.output_convs[level](x))


def add_upsampled(lateral: Tensor, top_down: Tensor) -> Tensor:
    """``lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")``.

    lateral: (N, C, H, W); top_down: (N, C, h, w). When H, W = 2h, 2w (always, for inputs padded to a
    multiple of 32) nearest upsampling repeats each top-down pixel over a 2 x 2 block, and the sum is
    accumulated into ``lateral`` in place (see :class:`_AddUpsampled2x`) without building the upsampled
    map; other sizes, and a traced export (the in-place kernel has no ONNX form), take ``F.interpolate``.
    """
    h, w = top_down.shape[-2:]
    if tuple(lateral.shape[-2:]) != (2 * h, 2 * w) or torch.jit.is_tracing():
        return lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
    return _AddUpsampled2x.apply(lateral, top_down)


class _AddUpsampled2x(torch.autograd.Function):
    """``lateral += top_down`` repeated 2 x 2, in place; lateral (N, C, 2h, 2w), top_down (N, C, h, w).

    Forward: one pass over ``lateral`` through its (N, C, h, 2, w, 2) view, several times faster than
    interpolating then adding (in channels-last memory). Backward: ``lateral`` passes the gradient
    through; each top-down pixel gets the sum of its 2 x 2 block, added up from four strided slices
    in float32 (autograd's own reduction over the broadcast view is an order of magnitude slower).
    """

    @staticmethod
    def forward(ctx, lateral: Tensor, top_down: Tensor) -> Tensor:
        h, w = top_down.shape[-2:]
        # (N, C, 2h, 2w) -> (N, C, h, 2, w, 2) += (N, C, h, 1, w, 1)
        lateral.unflatten(3, (w, 2)).unflatten(2, (h, 2)).add_(top_down[:, :, :, None, :, None])
        ctx.mark_dirty(lateral)
        return lateral

    @staticmethod
    def backward(ctx, grad: Tensor):
        block_sum = (grad[:, :, 0::2, 0::2].float() + grad[:, :, 1::2, 0::2]
                     + grad[:, :, 0::2, 1::2] + grad[:, :, 1::2, 1::2])  # (N, C, h, w)
        return grad, block_sum.to(grad.dtype)
