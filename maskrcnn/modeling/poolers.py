"""RoI pooling over the pyramid: assign each RoI to one level, RoIAlign it there.

Shorthand: R RoIs over the whole batch, C channels, S output side (7 for boxes, 14 for masks).
An RoI of side sqrt(w*h) = s goes to level floor(canonical_level + log2(s / canonical_scale)),
clamped to the pooled levels (FPN paper, eq. 1).
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn
from torchvision.ops import box_area
from torchvision.ops import roi_align as tv_roi_align

from ..config import ModelConfig, RoIHeadsConfig
from .roi_align import roi_align as fast_roi_align
from .selection import to_rois


def assign_levels(boxes: Tensor, *, min_level: int, max_level: int, canonical_scale: int,
                  canonical_level: int) -> Tensor:
    """boxes: (R, 4) xyxy pixels -> (R,) int64 level index counted from ``min_level``."""
    scale = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + 1e-6)
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


class MultiLevelRoIAlign(nn.Module):
    """Args:
        output_size: S.
        strides: stride of each pooled level, e.g. (4, 8, 16, 32) for P2..P5.
        sampling_ratio: bilinear samples per bin side.
        canonical_scale, canonical_level: level assignment (224 at level 4).
        fast: use the embedding_bag RoIAlign (same values as torchvision's kernel, faster on CPU).

    forward(features: list of (N, C, Hi, Wi), boxes: list of N (Ri, 4) xyxy pixels of the resized input)
    -> (R, C, S, S), RoIs in the order of the concatenated boxes.
    """

    def __init__(self, *, output_size: int, strides, sampling_ratio: int,
                 canonical_scale: int = RoIHeadsConfig.canonical_scale,
                 canonical_level: int = RoIHeadsConfig.canonical_level, fast: bool = ModelConfig.fast_roi_align):
        super().__init__()
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = int(round(math.log2(strides[-1])))
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.fast = fast

    def forward(self, features: List[Tensor], boxes: List[Tensor]) -> Tensor:
        return self.pool(features, to_rois(boxes))

    def in_read_layout(self, features: List[Tensor]) -> List[Tensor]:
        """``features`` with the pooled levels in the memory layout that this pooler's RoIAlign reads:
        channels-last for the fast one, whose ``(N*H*W, C)`` rows are then a view instead of a copy. The
        values are unchanged; converting once lets two poolers of the same levels share the copy."""
        if not (self.fast and self.sampling_ratio > 0):
            return features
        n = len(self.scales)
        return [f.contiguous(memory_format=torch.channels_last) for f in features[:n]] + list(features[n:])

    def pool(self, features: List[Tensor], rois: Tensor) -> Tensor:
        """rois: (R, 5) float, image index then x1, y1, x2, y2 pixels of the resized input -> (R, C, S, S).

        Written without Python branches on the RoIs (sizes are read as ``shape``, a level without RoIs
        pools zero of them), so that a traced export keeps every level for any input.
        """
        features = features[: len(self.scales)]
        align = fast_roi_align if self.fast else tv_roi_align
        levels = assign_levels(rois[:, 1:], min_level=self.min_level, max_level=self.max_level,
                               canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)
        size = (self.output_size, self.output_size)
        tracing = torch.jit.is_tracing()
        if not tracing:  # every RoI has one level, so every row is written below; the layout of ``align``'s output
            layout = torch.channels_last if self.fast and self.sampling_ratio > 0 else torch.contiguous_format
            out = torch.empty((rois.shape[0], features[0].shape[1], *size), dtype=features[0].dtype,
                              device=features[0].device, memory_format=layout)
        indices, pooled_levels = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level)[:, 0]
            pooled = align(feature, rois[index], size, scale, self.sampling_ratio).to(features[0].dtype)
            if tracing:
                indices.append(index)
                pooled_levels.append(pooled)
            else:  # in place: one write of each pooled RoI
                out.index_copy_(0, index, pooled)
        if tracing:  # the levels' RoIs concatenated, then put back in RoI order by one gather (a graph has no
            # in-place write; a scatter per level would copy the whole output each time)
            inverse = torch.argsort(torch.cat(indices))  # row of each RoI in the concatenation
            out = torch.cat(pooled_levels).index_select(0, inverse)
        return out
