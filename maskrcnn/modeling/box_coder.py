"""Box regression coding: boxes <-> (dx, dy, dw, dh) deltas relative to reference boxes.

    dx = wx * (gx - rx) / rw      dw = ww * log(gw / rw)
    dy = wy * (gy - ry) / rh      dh = wh * log(gh / rh)

with (rx, ry, rw, rh) the centre and size of the reference box and (gx, gy, gw, gh) of the target.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class BoxCoder:
    """Args:
        weights: (wx, wy, ww, wh) scaling of the deltas: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
        scale_clamp: upper bound on dw/dh before exp, so that a wild prediction cannot overflow.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, target_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """target_boxes, reference_boxes: (R, 4) float xyxy pixels -> (R, 4) deltas."""
        wx, wy, ww, wh = self.weights
        rw = reference_boxes[:, 2] - reference_boxes[:, 0]
        rh = reference_boxes[:, 3] - reference_boxes[:, 1]
        rx = reference_boxes[:, 0] + 0.5 * rw
        ry = reference_boxes[:, 1] + 0.5 * rh
        gw = target_boxes[:, 2] - target_boxes[:, 0]
        gh = target_boxes[:, 3] - target_boxes[:, 1]
        gx = target_boxes[:, 0] + 0.5 * gw
        gy = target_boxes[:, 1] + 0.5 * gh
        return torch.stack(
            [wx * (gx - rx) / rw, wy * (gy - ry) / rh, ww * torch.log(gw / rw), wh * torch.log(gh / rh)], dim=1
        )

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """deltas: (R, 4*K) float, K boxes per reference; reference_boxes: (R, 4) xyxy pixels.

        Returns (R, K, 4) xyxy pixels, in the dtype of ``deltas``.
        """
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (reference_boxes[:, 2] - reference_boxes[:, 0])[:, None]
        heights = (reference_boxes[:, 3] - reference_boxes[:, 1])[:, None]
        ctr_x = reference_boxes[:, 0, None] + 0.5 * widths
        ctr_y = reference_boxes[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * torch.exp(dw) * widths
        half_h = 0.5 * torch.exp(dh) * heights
        return torch.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h], dim=2)
