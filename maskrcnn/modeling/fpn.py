"""Feature pyramid: lateral 1x1 convs, a top-down nearest-neighbour path, 3x3 output convs.

Shorthand: N images; level Pk has stride 2**k and shape (N, C, Hk, Wk), C = ``out_channels``.
Inputs C2..C5 from the trunk; outputs P2..P5 plus P6, a stride-2 subsampling of P5 (max-pool with
kernel 1), used by the RPN only.
"""

from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """Args:
        in_channels: channels of C2..C5.
        out_channels: channels of every output level.

    forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6].
    """

    strides = (4, 8, 16, 32, 64)

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.out_channels = out_channels
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        top_down = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](top_down)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[level](features[level])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[level](top_down))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
