"""Anchor generation, one anchor size per pyramid level.

Shorthand: L levels, A anchors per location (one per aspect ratio), Hi/Wi the size of level i.
Anchors of level i are ordered location-major: index ``(y * Wi + x) * A + a``, matching the
``(N, A, Hi, Wi) -> (N, Hi*Wi*A)`` flattening of the RPN outputs.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """Args:
        sizes: anchor side (pixels of the resized input) per level, e.g. (32, 64, 128, 256, 512).
        aspect_ratios: height / width ratios, shared by all levels.

    forward(feature_shapes, padded_size) -> list of L tensors (Hi*Wi*A, 4), xyxy in pixels of the
    padded input; the same for every image of the batch.
    """

    def __init__(self, *, sizes: Sequence[int], aspect_ratios: Sequence[float]):
        super().__init__()
        self.sizes = tuple(sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.num_anchors_per_location = len(self.aspect_ratios)
        self._cache: dict = {}

    def cell_anchors(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(A, 4) anchors centred on (0, 0), rounded to whole pixels."""
        ratios = torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = w_ratios * size
        hs = h_ratios * size
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def forward(self, feature_shapes: List[Tuple[int, int]], padded_size: Tuple[int, int],
                device: torch.device, dtype: torch.dtype = torch.float32) -> List[Tensor]:
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(f"{len(feature_shapes)} feature levels but {len(self.sizes)} anchor sizes")
        key = (tuple(feature_shapes), tuple(padded_size), device, dtype)
        if key in self._cache:
            return self._cache[key]
        anchors = []
        for (hi, wi), size in zip(feature_shapes, self.sizes):
            # The stride is the integer ratio of padded input to feature size (as torchvision computes it).
            stride_y, stride_x = padded_size[0] // hi, padded_size[1] // wi
            shift_x = torch.arange(wi, dtype=torch.int32, device=device).to(dtype) * stride_x
            shift_y = torch.arange(hi, dtype=torch.int32, device=device).to(dtype) * stride_y
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
            cell = self.cell_anchors(size, dtype, device)
            anchors.append((shifts + cell[None]).reshape(-1, 4))  # (Hi*Wi, A, 4) -> (Hi*Wi*A, 4)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors
