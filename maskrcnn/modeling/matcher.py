"""Matching candidates (anchors or proposals) to ground truth, and balanced sampling of the matches.

Shorthand: M ground-truth boxes, R candidates. Match labels: index >= 0 of the matched ground truth,
``BELOW_LOW`` (-1, background) or ``BETWEEN`` (-2, ignored).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou


class Matcher:
    """Assigns each candidate the ground truth of highest IoU.

    Args:
        high_threshold: IoU at or above which a candidate is matched.
        low_threshold: IoU below which a candidate is background; in between it is ignored.
        allow_low_quality_matches: also match, for every ground truth, the candidates of highest IoU
            with it (ties included), even below ``high_threshold``, so that no ground truth goes unmatched.
    """

    BELOW_LOW = -1
    BETWEEN = -2

    def __init__(self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} must not exceed high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: (M, R) float, M >= 1 -> (R,) int64 match labels."""
        matched_vals, matches = iou.max(dim=0)
        all_matches = matches.clone()
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW
        matches[(matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)] = self.BETWEEN
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1).values
            candidates = torch.nonzero(iou == best_per_gt[:, None])[:, 1]
            matches[candidates] = all_matches[candidates]
        return matches


def match_boxes(matcher: Matcher, gt_boxes: Tensor, candidates: Tensor) -> Tensor:
    """Match labels for candidates (R, 4) against gt_boxes (M, 4), both xyxy pixels; all background if M == 0."""
    if len(gt_boxes) == 0:
        return torch.full((len(candidates),), Matcher.BELOW_LOW, dtype=torch.int64, device=candidates.device)
    return matcher(box_iou(gt_boxes, candidates))


def ignore_crowd(matches: Tensor, candidates: Tensor, crowd_boxes: Tensor, threshold: float = 0.5) -> Tensor:
    """Mark background candidates lying mostly inside a crowd region as ignored.

    matches: (R,) match labels; candidates: (R, 4); crowd_boxes: (C, 4), xyxy pixels. A candidate whose
    intersection with a crowd box covers at least ``threshold`` of its own area is set to ``BETWEEN``.
    Returns a new (R,) tensor.
    """
    if len(crowd_boxes) == 0:
        return matches
    lt = torch.max(candidates[:, None, :2], crowd_boxes[None, :, :2])
    rb = torch.min(candidates[:, None, 2:], crowd_boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (R, C)
    ioa = inter / box_area(candidates).clamp(min=1e-6)[:, None]
    inside = ioa.max(dim=1).values >= threshold
    return torch.where(inside & (matches == Matcher.BELOW_LOW), torch.full_like(matches, Matcher.BETWEEN), matches)


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float) -> Tuple[Tensor, Tensor]:
    """Random subset of positives (labels >= 1) and negatives (labels == 0); -1 is never sampled.

    labels: (R,) int64. At most ``batch_size * positive_fraction`` positives; negatives fill the rest.
    Returns (positive indices, negative indices), int64.
    """
    positive = torch.nonzero(labels >= 1)[:, 0]
    negative = torch.nonzero(labels == 0)[:, 0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return pos, neg
