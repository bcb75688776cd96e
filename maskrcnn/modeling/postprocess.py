"""Inference post-processing: detection selection, and mapping detections back to the original image.

Shorthand: R proposals of one image, K object classes, D detections, S = 28 mask side.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, nms, remove_small_boxes

from ..rle import encode_mask_regions
from .paste import paste_mask_regions, paste_masks_in_image

MASK_FORMATS = ("bitmap", "rle", "probs", "none")


def select_detections(boxes: Tensor, scores: Tensor, image_size: Tuple[int, int], *, score_thresh: float,
                      nms_thresh: float, topk: int) -> Dict[str, Tensor]:
    """Per-class candidates -> final detections of one image.

    boxes: (R, K, 4) per-class decoded boxes, xyxy pixels of the resized input; scores: (R, K+1) softmax
    probabilities with background at index 0; image_size: (h, w) for clipping.
    Every (proposal, class) pair scoring above ``score_thresh`` is a candidate; candidates under 0.01 px
    are dropped; NMS runs per class; the ``topk`` best survive.
    Returns ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) int64 in 1..K, highest score first.
    """
    num_classes = boxes.shape[1]
    boxes = clip_boxes_to_image(boxes, image_size).reshape(-1, 4)  # (R, K, 4) -> (R*K, 4)
    labels = torch.arange(1, num_classes + 1, device=boxes.device).repeat(len(scores))
    scores = scores[:, 1:].reshape(-1)
    keep = torch.nonzero(scores > score_thresh)[:, 0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = top_class_nms(boxes, scores, labels, nms_thresh, topk)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def top_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, topk: int) -> Tensor:
    """Exactly ``batched_nms(boxes, scores, labels, iou_threshold)[:topk]``, deciding only the candidates it needs.

    boxes: (C, 4) xyxy pixels; scores: (C,); labels: (C,) int64 class of each candidate.
    ``batched_nms`` has two routes, chosen by the number of candidates (at most 1,000 on the CPU or 25,000 on
    CUDA: one NMS over boxes shifted apart by class, whose float32 rounding of the shifted coordinates
    decides pairs within about 1e-3 of the threshold; above: NMS class by class). Small sets run
    ``batched_nms`` itself. Large ones take the class-by-class route on the best candidates first: greedy
    NMS settles a candidate by the higher-scoring candidates alone, so NMS over the best n keeps exactly
    what NMS over all of them keeps among those n. Starting from n = 4 topk, n grows fourfold until
    ``topk`` candidates survive or all are in: with K classes and R proposals this runs NMS on a few
    hundred candidates instead of R*K. Returns (D,) int64 indices, highest score first (equal scores
    aside, the indices ``batched_nms`` gives).
    """
    if not _takes_class_by_class_route(boxes):
        return batched_nms(boxes, scores, labels, iou_threshold)[:topk]
    order = torch.sort(scores, descending=True, stable=True).indices
    count = min(4 * topk, len(order))
    while True:
        best = order[:count]
        keep = _class_by_class_nms(boxes[best], scores[best], labels[best], iou_threshold)
        if len(keep) >= topk or count == len(order):
            return best[keep[:topk]]
        count = min(4 * count, len(order))


def _takes_class_by_class_route(boxes: Tensor) -> bool:
    """Whether ``batched_nms`` runs NMS class by class on these (C, 4) boxes (its size rule)."""
    return boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000)


def _class_by_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class, survivors by decreasing score: ``batched_nms``'s route for large sets."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label)[:, 0]
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.nonzero(keep)[:, 0]
    return kept[scores[kept].sort(descending=True)[1]]


def rescale_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """(D, 4) xyxy pixels of an image of ``from_size`` (h, w) -> pixels of an image of ``to_size``."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32) / torch.tensor(from_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32) / torch.tensor(from_size[1], dtype=torch.float32)
    scale = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes)
    return boxes * scale


def to_original_image(result: Dict[str, Tensor], resized_size: Tuple[int, int], original_size: Tuple[int, int],
                      *, mask_format: str = "bitmap", mask_threshold: float = 0.5,
                      memory_mb: int = 256) -> Dict[str, object]:
    """Map one image's detections from the resized input back to the original image.

    result: ``boxes`` (D, 4) in resized pixels, ``scores``, ``labels``, ``mask_probs`` (D, S, S).
    mask_format: what becomes of the S x S mask probabilities, each resized to its box in the H x W
        original image and thresholded at ``mask_threshold``:
        "bitmap": ``masks`` (D, H, W) bool;
        "rle": ``masks`` as D COCO RLE dicts, encoded from each box's region (no full-image canvas);
        "probs": the unpasted ``mask_probs`` (D, S, S) float;
        "none": no mask entry.
    memory_mb: budget of the chunked paste.
    Returns ``boxes`` (D, 4) xyxy in original pixels, ``scores``, ``labels`` and the mask entry.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    out = {"boxes": rescale_boxes(result["boxes"], resized_size, original_size),
           "scores": result["scores"], "labels": result["labels"]}
    probs = result["mask_probs"]
    if mask_format == "bitmap":
        out["masks"] = paste_masks_in_image(probs, out["boxes"], original_size, threshold=mask_threshold,
                                            memory_mb=memory_mb)
    elif mask_format == "rle":
        regions = paste_mask_regions(probs, out["boxes"], original_size, threshold=mask_threshold,
                                     memory_mb=memory_mb)
        out["masks"] = encode_mask_regions(regions, original_size)
    elif mask_format == "probs":
        out["mask_probs"] = probs
    return out
