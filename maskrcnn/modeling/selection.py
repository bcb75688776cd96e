"""Selection over a whole batch at once: NMS of many groups kept apart by the operator's axes, ranks within
a group, clipping to each image, and the split back into per-image lists. Proposal selection (rpn.py) and
detection selection (postprocess.py) are written with these, loop-free over images, so that the same code
runs eagerly and traced into the exported graph. The two operators without a plain ONNX equivalent,
``maskrcnn::grouped_nms`` and ``maskrcnn::descending_order``, are custom operators: the export gives each its
ONNX form (:mod:`maskrcnn.deploy.export`), the algorithm stays here.

Shorthand:
    B   entries of the NMS batch axis;  C  its class axis;  S  boxes of an entry
    N   images;  G  groups of a ranking;  M  selected rows
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor
from torchvision.ops import nms

# A score at or below this takes no part in :func:`grouped_nms` (real scores are probabilities, >= 0).
SKIP = -0.5


@torch.library.custom_op("maskrcnn::grouped_nms", mutates_args=())
def grouped_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each (entry, class) of ``scores`` apart, with the semantics of ONNX NonMaxSuppression.

    boxes: (B, S, 4) xyxy pixels, shared by the C classes of an entry; scores: (B, C, S), those at or below
    ``SKIP`` taking no part; iou_threshold: a box whose IoU with a kept higher-scoring box of its (entry,
    class) exceeds this is dropped.
    Returns (M, 3) int64 rows (entry, class, box) of the survivors.

    It runs torchvision's ``nms`` on each non-empty (entry, class) alone; :mod:`maskrcnn.deploy.export`
    exports it as one NonMaxSuppression operator. Groups are never mixed, so that a group's survivors depend
    on its own boxes only: not on the other images of a batch, nor on where an image sits in it.
    """
    entry, cls, box = torch.nonzero(scores > SKIP).unbind(1)
    group = entry * scores.shape[1] + cls
    order = torch.argsort(group, stable=True)
    sizes = torch.unique_consecutive(group[order], return_counts=True)[1].tolist()
    kept = []
    for members in order.split(sizes):
        e, c, b = entry[members], cls[members], box[members]
        kept.append(members[nms(boxes[e, b], scores[e, c, b], iou_threshold)])
    kept = torch.cat(kept) if kept else order
    return torch.stack([entry[kept], cls[kept], box[kept]], dim=1)


@torch.library.custom_op("maskrcnn::descending_order", mutates_args=())
def descending_order(scores: Tensor, group: Tensor) -> Tensor:
    """(M,) scores and (M,) int64 groups -> (M,) int64 indices in which each group's elements come by
    descending score. Each group is sorted alone, in its elements' order, by ``torch.sort``: equal scores
    then rank as torchvision ranks them (its NMS helpers sort each image's survivors so), and never by what
    the other groups (the other images of a batch) hold. :mod:`maskrcnn.deploy.export` exports it as one
    ONNX TopK over all elements, which also gives each group's elements by descending score (equal scores:
    lower index first)."""
    order = torch.argsort(group, stable=True)
    sizes = torch.unique_consecutive(group[order], return_counts=True)[1].tolist()
    parts = [members[torch.sort(scores[members], descending=True).indices] for members in order.split(sizes)]
    return torch.cat(parts) if parts else order


def rank_within_group(scores: Tensor, group: Tensor, num_groups: Union[int, Tensor]) -> Tensor:
    """scores: (M,); group: (M,) int64 in 0..G-1 -> (M,) int64 each element's 0-based rank by descending
    score among the elements of its group (equal scores as :func:`descending_order` ranks them)."""
    order, ranks = _ranked(scores, group, num_groups)
    return torch.empty_like(ranks).scatter(0, order, ranks)


def best_per_group(scores: Tensor, group: Tensor, num_groups: Union[int, Tensor], k: int) -> Tensor:
    """The ``k`` highest-scoring elements of each group: (M,) scores and int64 groups -> (D,) int64 indices,
    grouped by ascending group, highest score first within a group (equal scores as :func:`descending_order`
    ranks them)."""
    order, ranks = _ranked(scores, group, num_groups)
    keep = order[ranks < k]
    # A stable grouping of the score order by group: the key is (group, position in the score order).
    position = torch.arange(keep.shape[0], device=keep.device)
    return keep[torch.argsort(group[keep] * keep.shape[0] + position)]


def _ranked(scores: Tensor, group: Tensor, num_groups: Union[int, Tensor]):
    """The elements, each group's by descending score (:func:`descending_order`), and the rank of each within
    its group in that order: two (M,) int64 tensors."""
    order = descending_order(scores, group)
    one_hot = (group[order, None] == torch.arange(num_groups, device=group.device)[None]).to(torch.int64)  # (M, G)
    return order, (one_hot.cumsum(0) * one_hot).sum(1) - 1


def at_most(x: Tensor, k: int, dim: int) -> Union[int, Tensor]:
    """min(k, x.shape[dim]), kept as a graph value while tracing so that it follows the input's size."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(x)[dim], max=k)
    return min(k, x.shape[dim])


def clip_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes (..., 4) xyxy pixels clipped to [0, w] x [0, h]; image_sizes (..., 2) int64 (h, w) of each box's
    image, broadcast against ``boxes``' leading dimensions."""
    h = image_sizes[..., 0:1].to(boxes.dtype)
    w = image_sizes[..., 1:2].to(boxes.dtype)
    x = torch.min(boxes[..., 0::2].clamp(min=0), w)
    y = torch.min(boxes[..., 1::2].clamp(min=0), h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """N per-image (Ri, 4) boxes -> (R, 5) RoIs: image index, then x1, y1, x2, y2."""
    concat = torch.cat(list(boxes))
    index = torch.cat([torch.full((len(b),), i, dtype=concat.dtype, device=concat.device)
                       for i, b in enumerate(boxes)])
    return torch.cat([index[:, None], concat], dim=1)


def split_by_image(image_index: Tensor, num_images: int, *values: Tensor) -> List[List[Tensor]]:
    """Per-image pieces of tensors whose rows are grouped by ascending ``image_index`` (M,): for each of
    ``values`` (M, ...) a list of ``num_images`` tensors (Mi, ...)."""
    counts = torch.bincount(image_index, minlength=num_images).tolist()
    return [list(v.split(counts)) for v in values]
